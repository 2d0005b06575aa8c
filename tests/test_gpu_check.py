"""benchmarks/gpu_check.sh: the CPU mode end to end (what CI can run), and the harness around the checks."""
import json
import subprocess
from pathlib import Path

import pytest
import torch

from tools import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_mode_passes_every_check(tmp_path):
    proc = subprocess.run(['bash', 'benchmarks/gpu_check.sh', '--cpu', '--out', str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    for check in gpu_check.CHECKS:
        assert any(line.startswith(f'PASS {check} ') for line in lines), (check, proc.stdout)
    assert f'{len(gpu_check.CHECKS)} of {len(gpu_check.CHECKS)} checks passed' in proc.stdout
    report = json.loads((tmp_path / 'gpu_check_cpu.json').read_text())
    assert [c['check'] for c in report['checks']] == list(gpu_check.CHECKS)
    assert all(c['status'] == 'PASS' for c in report['checks'])
    runs = report['checks'][0]['runs']
    assert len(runs) == 6  # three models, float32 and bfloat16
    for losses in (r['losses'] for r in runs.values()):
        assert sum(losses[-3:]) < sum(losses[:3])
    assert report['environment']['torch'] == torch.__version__
    assert '| ddp | PASS |' in (tmp_path / 'gpu_check_cpu.md').read_text()
    # Only the report is left behind: runs and figures went to a scratch folder that is removed.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['gpu_check_cpu.json', 'gpu_check_cpu.md']


def test_a_failing_check_is_reported_and_the_others_still_run(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv('OMP_NUM_THREADS', '1')  # --cpu sets it for the processes it starts; undone after
    def broken(mode, out):
        raise gpu_check.CheckFailed('the loss did not fall: [2.3, 2.4]')

    def crashing(mode, out):
        raise RuntimeError('CUDA error: an illegal memory access was encountered')

    def passing(mode, out):
        return {'summary': 'fine'}

    monkeypatch.setitem(gpu_check.RUNNERS, 'train', broken)
    monkeypatch.setitem(gpu_check.RUNNERS, 'fused', crashing)
    monkeypatch.setitem(gpu_check.RUNNERS, 'compile', passing)
    assert gpu_check.main(['--cpu', '--only', 'train', 'fused', 'compile', '--out', str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert 'FAIL train' in out and 'the loss did not fall' in out
    assert 'FAIL fused' in out and 'RuntimeError: CUDA error' in out
    assert 'PASS compile (0s): fine' in out and '1 of 3 checks passed; failed: train, fused' in out
    report = json.loads((tmp_path / 'gpu_check_cpu.json').read_text())
    assert [c['status'] for c in report['checks']] == ['FAIL', 'FAIL', 'PASS']
    assert 'Traceback' in report['checks'][1]['traceback']


def test_without_triton_the_cpu_mode_skips_the_fused_check(tmp_path, monkeypatch, capsys, one_thread):
    from models import fused
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.setattr(fused, 'triton_importable', lambda: False)
    assert gpu_check.main(['--cpu', '--only', 'fused', '--out', str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert 'SKIP fused' in out and 'triton is not installed' in out and '0 of 1 checks passed; skipped: fused' in out


@pytest.mark.skipif(torch.cuda.is_available(), reason='the message for machines without CUDA')
def test_without_cuda_the_gpu_mode_says_to_use_cpu_mode(capsys):
    assert gpu_check.main([]) == 2
    assert capsys.readouterr().err.strip() == ('error: no CUDA device here; bash benchmarks/gpu_check.sh '
                                               '--cpu runs the checks that do not need one')


@pytest.mark.parametrize('name, slug', [('NVIDIA H100 80GB HBM3', 'h100'), ('NVIDIA A100-SXM4-80GB', 'a100'),
                                        ('NVIDIA GeForce RTX 4090', 'geforce_rtx_4090')])
def test_gpu_names_in_file_names(name, slug):
    assert gpu_check.gpu_slug(name) == slug


def test_cuda_mode_runs_the_benchmark_commands_of_the_benchmarks_readme():
    readme = (ROOT / 'benchmarks' / 'README.md').read_text().replace('\\\n', ' ')
    documented = {' '.join(line.split()) for line in readme.splitlines()
                  if 'python tools/benchmark.py' in line and '--device cuda' in line}
    ran = {' '.join([*(f'{k}={v}' for k, v in env.items()), 'python tools/benchmark.py', *args])
           for _, args, env in gpu_check.benchmark_commands(False, Path('benchmarks'), 'h100')}
    assert len(documented) == 5 and documented == ran, (documented ^ ran)
