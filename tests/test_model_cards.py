"""Blocks that scripts write into model cards (course_lib.checkpoint.card_section / replace_card_section)."""

import pytest

from course_lib.checkpoint import card_section, replace_card_section

CARD = "# Model card: x\n\n| a | b |\n\nLicence: Apache-2.0.\n"


def test_a_new_section_goes_before_the_licence_and_is_found_again():
    card = replace_card_section(CARD, "bench", "## Samplers\n\n| s | FID |\n")
    assert card.index("<!-- bench -->") < card.index("Licence")
    assert card_section(card, "bench") == "<!-- bench -->\n## Samplers\n\n| s | FID |\n<!-- /bench -->"
    assert card.startswith("# Model card: x\n\n| a | b |\n") and card.endswith("Licence: Apache-2.0.\n")


def test_replacing_keeps_one_block_and_the_rest_of_the_card():
    once = replace_card_section(CARD, "bench", "first")
    twice = replace_card_section(once, "bench", "second")
    assert twice.count("<!-- bench -->") == 1 and "first" not in twice and "second" in twice
    assert twice.replace(card_section(twice, "bench"), "") == once.replace(card_section(once, "bench"), "")


def test_a_card_without_a_licence_line_gets_the_block_at_the_end():
    card = replace_card_section("# card\n", "bench", "body")
    assert card == "# card\n\n<!-- bench -->\nbody\n<!-- /bench -->\n"


def test_missing_or_unclosed_sections_are_none_and_bad_names_are_refused():
    assert card_section(CARD, "bench") is None
    assert card_section("<!-- bench -->\nno end", "bench") is None
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        replace_card_section(CARD, "a -->", "x")


def test_a_model_files_cost_counts_every_run_of_its_chain():
    from course_lib.checkpoint import shipped, with_chain_totals
    from course_lib.vae import load_vae
    chain = {"steps": 3000, "train_seconds": 50.0,
             "initialised_from": {"steps": 3600, "train_seconds": 80.0, "earlier_steps": 274, "earlier_seconds": 9.0}}
    totals = with_chain_totals(dict(chain))
    assert (totals["steps_total"], totals["train_seconds_total"]) == (6874, 139.0)
    assert with_chain_totals({"steps": 5})["steps_total"] == 5                    # a run from scratch: its own
    info = load_vae(shipped("vae_emoji32"))[2]                                    # the shipped VAE: three runs
    first = info["initialised_from"]
    assert info["train_seconds_total"] == pytest.approx(info["train_seconds"] + first["train_seconds"]
                                                        + first["earlier_seconds"])
