"""The limb product that benchmarks/secure_latency.py (part 5) times against the engine's int64 matmul is exact."""
import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch

import timm_mpc  # noqa: F401  (registers mpcvit_*)

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
sys.path.insert(0, str(BENCHMARKS))  # as running the script does: it imports its neighbours (report_io)
_spec = importlib.util.spec_from_file_location('secure_latency', BENCHMARKS / 'secure_latency.py')
secure_latency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(secure_latency)


def _linear_shapes(name):
    model = timm.create_model(name)
    return sorted({(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)})


@pytest.mark.parametrize('name', ['mpcvit_tiny', 'mpcvit_small'])
def test_limb_product_is_exact_modulo_2_64_for_the_models_shapes(name):
    generator = torch.Generator().manual_seed(0)
    extremes = torch.tensor([2 ** 63 - 1, -(2 ** 63), -(2 ** 63) + 1, -1, 0, 1, 2 ** 21, -(2 ** 42), 2 ** 43 - 1])
    for k, n in _linear_shapes(name) + [(2100, 3)]:  # and a sum longer than one exact float64 block
        x = torch.randint(-(2 ** 63), 2 ** 63 - 1, (65, k), generator=generator)
        y = torch.randint(-(2 ** 63), 2 ** 63 - 1, (k, n), generator=generator)
        x[0, :len(extremes)], y[:len(extremes), 0] = extremes, extremes
        x[1], y[:, 1] = -(2 ** 63), -(2 ** 63)  # the most negative value in every term of one output
        x[2], y[:, 2] = 2 ** 63 - 1, 2 ** 63 - 1
        assert torch.equal(secure_latency.limb_matmul(x, y), x @ y), (name, k, n)


def test_limbs_recombine_and_stay_small():
    t = torch.tensor([2 ** 63 - 1, -(2 ** 63), -1, 0, 1, 12345678901234567])
    l0, l1, l2 = secure_latency.signed_limbs(t)
    assert max(float(v.abs().max()) for v in (l0, l1, l2)) <= 2 ** 21
    assert torch.equal(l0.long() + l1.long() * (1 << 22) + l2.long() * (1 << 43), t)
