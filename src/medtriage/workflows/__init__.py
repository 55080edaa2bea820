"""Where training meets export: the jobs that run one after the other (train and export, leave-one-site-out)."""
