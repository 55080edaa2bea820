"""From site folders and sample files to one pooled manifest with patient-level splits."""
