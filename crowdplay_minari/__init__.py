"""crowdplay-minari: CrowdPlay's human Atari demonstrations as Minari datasets.

Pipeline: raw CrowdPlay files (`crowdplay_minari.raw`) -> Minari datasets (`conversion`) ->
CrowdPlay-style loading, filtering and frame processing (`crowdplay_minari.loading`,
`crowdplay_minari.processing`) -> d3rlpy buffers and a gymnasium evaluation env
(`crowdplay_minari.d3rlpy_bridge`, `crowdplay_minari.envs`) -> offline RL grids (`benchmarks`).
"""

__version__ = "0.1.0"
