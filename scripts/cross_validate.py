"""Cross-validate a training config (Hydra): `python scripts/cross_validate.py experiment=pneumoniamnist_sota cv.folds=3`."""

from medtriage.cli.cross_validate import main

if __name__ == "__main__":
    main()
