"""A short sample of the SIGKILL campaign (issue 11 item 18; the full run, 100+ kill points
over cold, edit and RUN builds, is ``bench/sigkill_campaign.py``): after a build is killed at
a random moment, the next build gives the clean build's image, ``cache verify`` passes, and
no mount, process or lock is left."""

from __future__ import annotations

import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _campaign_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location(
        "sigkill_campaign", ROOT / "bench" / "sigkill_campaign.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
@pytest.mark.skipif(
    os.geteuid() != 0 or not Path("/bin/busybox").is_file(),
    reason="RUN needs root and busybox-static",
)
def test_sigkill_sample_cold_builds_with_run(tmp_path: Path) -> None:
    camp = _campaign_module()
    seed = int(os.environ.get("LBUILD_SIGKILL_SEED", random.randrange(1 << 30)))
    c = camp.run_campaign(
        tmp_path,
        2,
        seed,
        scenarios=("cold",),  # a cold build runs COPY, three RUN steps, compression, export
        variants=2,
        files=8,
        data_mb=1,
        probe=False,
    )
    assert len(c.log) == 2
    assert c.failures == [], c.failures
