"""Shared test setup.

Tiny models run fastest on one thread, and several torch processes each spinning on every core (the test run, a
helper, a demo) slow each other down by orders of magnitude on a 2-core machine: pin intra-op threads to one.
"""

import torch

torch.set_num_threads(1)
