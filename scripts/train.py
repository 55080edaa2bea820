"""Train a model as configured in configs/ (Hydra): `python scripts/train.py experiment=pneumonia_sites`."""

from medtriage.cli.train import main

if __name__ == "__main__":
    main()
