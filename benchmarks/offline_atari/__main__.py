"""`python -m crowdplay_minari.benchmarks.offline_atari`: run a grid."""

import sys

from crowdplay_minari.benchmarks.offline_atari.cli import main

sys.exit(main())
