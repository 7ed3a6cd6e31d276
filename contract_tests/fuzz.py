"""`make fuzz`: the contract test (`contract_tests.run`), deep. Not part of `make test`.

The same live stack, seeding, document and `--checks all` over every phase, with:

- `FUZZ_EXAMPLES` (default 300) cases per operation and phase instead of 12, and as many stateful
  scenarios (`FUZZ_STATEFUL_EXAMPLES` to set those apart);
- hostile strings written into generated bodies, queries and paths (`contract_tests.fuzz_hooks`);
- every case run to the end (`--continue-on-failure`), so one failure does not hide the next;
- the embedded API's rate limits off: the run sends far more than one caller's share, and 429s
  would stand in for the answers under test;
- `FUZZ_SEED` (default fixed) to explore elsewhere; reports in `build/fuzz/`.

Against `BASE_URL`, that server's own rate limits must be off (RATE_LIMIT_*_PER_SECOND=0).
"""

from __future__ import annotations

import os
import sys

from contract_tests.run import Profile, main

DEFAULT_EXAMPLES = "300"
DEFAULT_SEED = "20261201"


def fuzz_profile() -> Profile:
    examples = os.environ.get("FUZZ_EXAMPLES", DEFAULT_EXAMPLES)
    return Profile(
        name="fuzz",
        max_examples=examples,
        stateful_examples=os.environ.get("FUZZ_STATEFUL_EXAMPLES", examples),
        server_env={"RATE_LIMIT_TEMPORAL_PER_SECOND": "0", "RATE_LIMIT_UPDATES_PER_SECOND": "0"},
        schemathesis_args=(
            *("--seed", os.environ.get("FUZZ_SEED", DEFAULT_SEED)),
            "--continue-on-failure",
            *("--max-failures", "100000"),
            *("--report", "junit,ndjson"),
        ),
        schemathesis_env={"SCHEMATHESIS_HOOKS": "contract_tests.fuzz_hooks"},
    )


if __name__ == "__main__":
    sys.exit(main(fuzz_profile()))
