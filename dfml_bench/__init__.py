"""dfml-bench: a benchmark suite and leaderboard for data-free meta-learning (DFML).

The library is organised one module per concept:

- ``datasets``   images, labels and the meta-train / meta-val / meta-test class split
- ``episodes``   frozen, hashed N-way K-shot episodes shared by every method
- ``backbones``  Conv4 / ResNet-10 / ResNet-18, usable with ``torch.func.functional_call``
- ``zoo``        deterministic, hashed, cached pools of pre-trained models
- ``access``     white-box handles and metered black-box APIs
- ``methods``    the method interface, its context and the entry-point registry
- ``scenarios``  scenarios and suites (and their registry)
- ``evaluation`` the fixed test-time adaptation protocol, batched over episodes
- ``results``    per-run JSON records, written atomically
- ``runner``     the flow of a suite run
- ``leaderboard`` / ``cli``
"""

__version__ = "0.1.0"
