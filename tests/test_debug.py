import pytest
import torch
import torch.nn as nn

from mamba3 import Mamba3
from mamba3.debug import AnomalyError, check_op, detect_anomalies


def test_names_first_module_with_nonfinite_output():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), Mamba3(16, d_state=8, headdim=4), nn.Linear(16, 4))
    x = torch.randn(2, 5, 16)
    with detect_anomalies(model):
        model(x)  # finite: no error
    with torch.no_grad():
        model[1].dt_bias.fill_(float("inf"))  # dt = inf -> the mixer's output goes NaN
    with pytest.raises(AnomalyError, match=r"module 1 \(Mamba3\).*output"):
        with detect_anomalies(model):
            model(x)
    model(x)  # hooks removed after the block: no error outside it


def test_bad_input_is_not_blamed_on_the_module():
    lin = nn.Linear(4, 4)
    with detect_anomalies(lin):
        lin(torch.tensor([[float("nan")] * 4]))  # input already NaN: nothing new to report


def test_check_op_reports_op_name_only_in_anomaly_mode():
    out = torch.tensor([float("inf")])
    check_op("my_op", (torch.ones(1),), out)  # disabled: silent
    with detect_anomalies():
        with pytest.raises(AnomalyError, match="op my_op"):
            check_op("my_op", (torch.ones(1),), out)


def test_op_entry_point_reports_its_name():
    from mamba3.ops import mamba3_siso
    B, T, H, N, P = 1, 4, 2, 4, 2
    dt = torch.full((B, T, H), 0.1)
    args = [torch.randn(B, T, 1, N), torch.randn(B, T, 1, N), torch.randn(B, T, H, P), -dt, dt,
            torch.zeros(B, T, H), torch.ones(H, N), torch.ones(H, N), torch.zeros(B, T, 1)]
    args[3] = torch.full((B, T, H), 1e6)  # exp(dA) overflows: the op creates the Inf
    with detect_anomalies():
        with pytest.raises(AnomalyError, match=r"op mamba3_siso\[chunked\]"):
            mamba3_siso(*args)
