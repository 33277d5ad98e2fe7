"""The agent raises its soft RLIMIT_NOFILE to the hard limit at start (issue 13 item 9)."""

import subprocess
import sys

PROBE = """
import resource
from replicator.agent import raise_nofile_limit
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))
raise_nofile_limit()
print(resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_soft_nofile_limit_is_raised_to_the_hard_one():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "(512, 512)"
