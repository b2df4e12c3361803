#!/usr/bin/env python3
"""Reference ε values for aggregator-core/src/privacy.rs, from Google's dp-accounting.

python3 -m venv /tmp/dp && /tmp/dp/bin/pip install dp-accounting==0.6.0 && /tmp/dp/bin/python scripts/dp-reference.py
Prints (q, z, rounds, delta, eps with the Rust accountant's integer orders, eps with the
package's default orders) per case: the rows of the test DP_ACCOUNTING."""
import dp_accounting
from dp_accounting import rdp
ORDERS = list(range(2, 65)) + [128, 256]
cases = [(0.01, 1.1, 1000, 1e-5), (0.1, 1.0, 100, 1e-5), (0.05, 0.8, 200, 1e-6), (1.0, 5.0, 50, 1e-5), (0.001, 2.0, 10000, 1e-6), (0.2, 4.0, 40, 1e-3), (0.02, 0.5, 300, 1e-5)]
for q, z, steps, delta in cases:
    out = []
    for orders in (ORDERS, None):
        acc = rdp.RdpAccountant(orders) if orders else rdp.RdpAccountant()
        acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
        out.append(acc.get_epsilon(delta))
    print(f"({q}, {z}, {steps}, {delta:e}, {float(out[0])!r}, {float(out[1])!r}),")
