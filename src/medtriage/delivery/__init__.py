"""Delivery to a hospital: the offline install bundle (wheelhouse, model packages, installer, units, SBOM).

Torch-free, and it imports nothing of serve's runtime: it packs what a site installs.
"""
