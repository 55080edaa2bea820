"""Opt-in reduced JPEG 2000 decoding in the Predictor: the model's input size sets the level, scores stay close."""

from __future__ import annotations

from medtriage.serve.package import load_package
from medtriage.serve.predictor import J2K_SIDE_MARGIN, Predictor
from tests.io.test_dicom import sample_file


def test_predictor_scores_a_reduced_decode_close_to_the_full_one(package_dir):
    package = load_package(package_dir)
    full, reduced = Predictor(package, allow_out_of_scope=True), Predictor(package, allow_out_of_scope=True, reduced_j2k=True)
    assert full.min_decoded_side is None
    assert reduced.min_decoded_side == J2K_SIDE_MARGIN * package.meta["preprocessing"]["resize"]["size"]
    path = sample_file("RG1_J2KR.dcm")
    p_full, p_reduced = full.score_file(path)[0].probability, reduced.score_file(path)[0].probability
    assert p_full != p_reduced and abs(p_full - p_reduced) < 0.05


def test_score_command_takes_the_reduced_decode_on_request(package_dir, capsys):
    import json

    from medtriage.cli import main

    path = str(sample_file("RG1_J2KR.dcm"))
    probabilities = []
    for flags in ([], ["--reduced-j2k"]):
        assert main(["score", str(package_dir), path, "--allow-out-of-scope", "--json", *flags]) == 0
        probabilities.append(json.loads(capsys.readouterr().out)["results"][0]["probability"])
    full = Predictor(load_package(package_dir), allow_out_of_scope=True).score_file(sample_file("RG1_J2KR.dcm"))[0].probability
    assert probabilities[0] == full and probabilities[1] != full and abs(probabilities[1] - full) < 0.05
