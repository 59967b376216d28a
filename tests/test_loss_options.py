"""The shared loss-options reader (fewstep_jax/losses/options.py), the distance list and the registry."""

import ml_collections
import pytest

from fewstep_jax.losses import distances
from fewstep_jax.losses.api import get_factory, registered
from fewstep_jax.losses.options import read_options
from fewstep_jax.paths import RectifiedFlow
from fewstep_jax.students import Student

DEFAULTS = {"huber_c": 1e-3, "distance": "l2", "num_grid": 18}

# every term of every family: importing the package registers them all (no lazy, by-name imports)
TERMS = {
    "cd",
    "ctm",
    "diffusion",
    "dmd",
    "dmd_fake",
    "flow_matching",
    "lcm",
    "meanflow",
    "reflow",
    "reflow_distill",
    "shortcut",
    "straightness",
    "tcd",
    "tdm",
    "tdm_fake",
    "traflow",
    "traflow_con",
    "traflow_rec",
    "traflow_vel",
}


def test_block_overrides_defaults_and_weight_is_the_train_steps():
    cfg = ml_collections.ConfigDict({"weight": 2.0, "num_grid": 8})
    assert read_options(cfg, DEFAULTS, "t") == {"huber_c": 1e-3, "distance": "l2", "num_grid": 8}
    assert read_options({"num_grid": 4}, DEFAULTS, "t")["num_grid"] == 4
    assert read_options(None, DEFAULTS, "t") == DEFAULTS
    assert read_options(ml_collections.ConfigDict(), DEFAULTS, "t") is not DEFAULTS  # a copy


def test_unknown_key_names_the_term_the_key_and_the_closest_known_key():
    with pytest.raises(ValueError, match=r"loss term 'myterm': unknown config keys \['huber_cc'\]") as e:
        read_options({"huber_cc": 1.0}, DEFAULTS, "myterm")
    assert "did you mean 'huber_c'?" in str(e.value)
    with pytest.raises(ValueError) as e:
        read_options({"zzz": 1}, DEFAULTS, "myterm")
    assert "did you mean" not in str(e.value) and "'zzz'" in str(e.value)


def test_choices_are_checked_for_the_terms_own_options_only():
    choices = {"distance": ("l2", "huber"), "solver": ("euler",)}
    assert read_options({"distance": "huber"}, DEFAULTS, "t", choices)["distance"] == "huber"
    with pytest.raises(ValueError, match=r"loss term 't': distance must be one of \('l2', 'huber'\)"):
        read_options({"distance": "lpips"}, DEFAULTS, "t", choices)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_every_registered_term_reads_its_block_with_the_shared_reader(name):
    # other test modules register test-only terms (prefix "test_") in the same process
    assert {n for n in registered() if not n.startswith("test_")} == TERMS
    student = Student(lambda *a: a[1], RectifiedFlow())
    with pytest.raises(ValueError, match=rf"loss term '{name}': unknown config keys \['wieght'\]") as e:
        get_factory(name)(ml_collections.ConfigDict({"wieght": 1.0}), student)
    assert "did you mean 'weight'?" in str(e.value)


def test_family_distances_are_subsets_of_the_one_list():
    assert distances.allowed("l2", "huber_vec") == ("l2", "huber_vec")
    with pytest.raises(ValueError, match="lpips"):
        distances.allowed("l2", "lpips")
