import pytest

from mamba3 import doctor


def test_doctor_runs_on_cpu_and_reports_cpu_paths(capsys):
    rc = doctor.run()
    out = capsys.readouterr().out
    assert "torch" in out and "kernel paths" in out
    assert "mamba3_siso              -> chunked (PyTorch)" in out
    assert "no CUDA device" in out
    # every mixer of the registry has a smoke construction and passes
    from mamba3.models.config import MIXERS
    assert set(MIXERS) <= {n.split("-")[0] for n in doctor.MIXER_SMOKE}
    assert "FAIL" not in out, out
    assert rc == 0


def test_hopper_triton_warning():
    w = doctor.warnings_for(dict(compute_capability="9.0", triton="3.6.0", cuda_available=True))
    assert any("3.7.1" in s for s in w)
    assert doctor.warnings_for(dict(compute_capability="9.0", triton="3.7.1", cuda_available=True)) == []


def test_failed_check_is_reported_not_raised(monkeypatch):
    monkeypatch.setitem(doctor.MIXER_SMOKE, "broken", ("mamba3.layers.mamba3:Mamba3", dict(d_state=7, headdim=4)))
    results = doctor.self_checks(doctor.environment())
    broken = [r for r in results if r[0].startswith("broken")]
    assert broken and broken[0][1] is False and "d_state must be even" in broken[0][2]
