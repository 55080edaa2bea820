"""A synthetic tile pool needs one or more distinct sites: none would write an empty pool, and a repeated one would
give two slides the same patient ID, merging them into one patient across the splits."""

import pytest

from medtriage.config.schema import SyntheticTilesConfig
from medtriage.data.simulate.tiles import build_synthetic_tile_pool
from medtriage.errors import InputError


@pytest.mark.parametrize("sites", [[], ["synthetic_site_a", "synthetic_site_b", "synthetic_site_a"]])
def test_no_sites_or_a_repeated_site_is_refused_before_anything_is_written(tmp_path, sites):
    config = SyntheticTilesConfig(sites=sites, patients_per_site=2, tiles_per_slide=1, tile_size=16)
    with pytest.raises(InputError, match="distinct sites") as refused:
        build_synthetic_tile_pool(tmp_path / "pool", config)
    assert refused.value.where == "data.tiles.sites"
    assert not (tmp_path / "pool").exists()


def test_distinct_sites_each_give_their_patients(tmp_path):
    config = SyntheticTilesConfig(sites=["synthetic_site_a", "synthetic_site_b"], patients_per_site=2, tiles_per_slide=1, tile_size=16)
    manifest = build_synthetic_tile_pool(tmp_path / "pool", config)
    assert sorted(manifest.sites) == ["synthetic_site_a", "synthetic_site_b"]
