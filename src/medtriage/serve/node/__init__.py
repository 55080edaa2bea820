"""`medtriage listen`: a DICOM node. Storage SCP in (scp) -> durable queue (store) -> scores and one SR
per study (worker) -> C-STORE / STOW-RS back to the PACS (sender); `cli` wires them together."""
