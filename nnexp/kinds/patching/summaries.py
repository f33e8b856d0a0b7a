"""Activation patching's view over a dataset of results: the normalised effect of each
site averaged over examples with bootstrap intervals (`nnexp.statistics`).

A site with a position axis is averaged by role (`nnexp.roles`: IO, S1, S2, END and the
tokens between them, or the roles a data file names), so examples of every template
and length make one role x layer map; positions that are no role are left out (they
stay in the per-example and per-group figures). A site without one (patched at all
positions: per layer, or per layer and head) is averaged over every example as is.
"""

from __future__ import annotations

from ...roles import align
from ...statistics import Estimate, bootstrap, estimate_of, settings

KIND = "patching"


def site_estimate(experiment, results, site: str) -> Estimate:
    """The mean normalised effect of `site` over every example with its interval: dims
    with "role" in place of "position" when the site has positions (examples without a
    role count for none of its cells)."""
    records = list(results)
    if "position" in records[0][site].dims:
        return bootstrap(align(records, site), **settings(experiment))
    return estimate_of(records, site, experiment)


def summary_rows(experiment, results) -> list[dict]:
    """Per site: the role-aligned (or all-position) mean effect per cell with its interval."""
    rows = []
    for site in experiment.sites:
        rows += site_estimate(experiment, results, site).rows(KIND, f"effect ({site})")
    return rows
