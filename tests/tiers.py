"""The test tiers: every test carries exactly one of the markers below, and `pytest` with no
arguments runs the fast tier.

- fast: no compiler and no simulator (minutes);
- sim: builds or runs bmodels on the simulator, with generated models;
- real: real weights (SmolLM2), in the main job's build folder.

A test with no tier, or with two, fails the collection with its name: a test nobody can select by
tier would silently drop out of every run but the whole suite's."""
import pytest

TIERS = ("fast", "sim", "real")
DEFAULT = "fast"
EVERY_TIER = " or ".join(TIERS)


def pytest_configure(config):
    # `pytest` alone (the tests found from testpaths): the fast tier. Naming files or tests, or
    # giving -m, chooses instead.
    if not config.option.markexpr and config.args_source != pytest.Config.ArgsSource.ARGS:
        config.option.markexpr = DEFAULT


def pytest_report_header(config):
    return f"tiers: -m {config.option.markexpr or '(none: every test named)'!r}; " \
           f"every tier: -m {EVERY_TIER!r}"


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a test without a tier fails every run
def pytest_collection_modifyitems(items):
    wrong = [(item.nodeid, tiers) for item in items
             if len(tiers := [t for t in TIERS if item.get_closest_marker(t)]) != 1]
    if wrong:
        raise pytest.UsageError("every test needs exactly one tier marker of " + ", ".join(TIERS) + ":\n"
                                + "\n".join(f"  {nodeid}: {', '.join(tiers) or 'no tier'}"
                                            for nodeid, tiers in wrong))
