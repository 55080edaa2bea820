"""Where pooled images come from: MedMNIST npz files, simulated hospital sites, pathology tiles."""
