"""tools/benchmark.py: the table's cost columns, and the comparisons in their quick CPU mode."""
import csv
import json

import pytest

from tools import benchmark

NINE = benchmark.TABLE_MODELS


def run(tmp_path, *argv):
    out = tmp_path / 'rows.json'
    assert benchmark.main([*argv, '--json', str(out)]) == 0
    return json.loads(out.read_text())


def test_table_gives_the_papers_params_and_flops_for_all_nine(tmp_path, reference, capsys):
    rows = run(tmp_path, '--table', '--reference', str(reference / 'imagenet1k_table.csv'))
    paper = {r['config']: r for r in csv.DictReader((reference / 'imagenet1k_table.csv').open())}
    assert [r['config'] for r in rows] == NINE == list(paper)
    for r in rows:
        params = r['params_m']
        if r['config'] == 'focalnet_base_iso':
            params -= 12 * 2 * 768 / 1e6  # the modulation layer norms the paper's count omits
        assert round(params, 1) == r['paper_params_m'] == float(paper[r['config']]['params_m'])
        assert round(r['gflops'], 1) == r['paper_gflops'] == float(paper[r['config']]['gflops'])
        assert r['throughput_imgs_s'] is None
        assert r['paper_throughput_imgs_s'] == float(paper[r['config']]['throughput_v100_imgs_s'])
        assert r['paper_top1'] == float(paper[r['config']]['top1'])
    text = capsys.readouterr().out
    assert '18,432' in text and '| focalnet_tiny_srf | 28.4 | 28.4 | 4.4 | 4.4 |' in text


def test_table_without_the_reference_file_uses_the_built_in_copy(tmp_path, capsys):
    rows = run(tmp_path, '--table', '--models', 'focalnet_tiny_lrf', '--reference',
               str(tmp_path / 'absent.csv'))
    assert rows[0]['paper_params_m'] == 28.6 and rows[0]['paper_gflops'] == 4.5
    assert 'built-in copy' in capsys.readouterr().out


def test_table_throughput_in_quick_mode(tmp_path):
    (row,) = run(tmp_path, '--table', '--throughput', '--quick', '--device', 'cpu',
                 '--models', 'focalnet_tiny_iso')
    assert row['throughput_imgs_s'] > 0 and row['batch_size'] == 2 and row['img_size'] == 64
    assert row['torch_version'] and row['device'].startswith('CPU') and row['commit']


@pytest.mark.parametrize('other,name', [('timm', 'focalnet_tiny_srf'), ('hf', 'focalnet_tiny_iso')])
def test_compare_quick_mode(tmp_path, other, name, capsys):
    rows = run(tmp_path, '--compare', other, '--quick', '--device', 'cpu', '--models', name)
    assert [r['impl'] for r in rows] == ['ours', other]
    for r in rows:
        assert r['config'] == name and r['output_rel_err'] < 1e-4
        assert r['infer_imgs_s'] > 0 and r['train_imgs_s'] > 0
        assert r['train_peak_mib'] is None  # peak memory is measured on CUDA only
    ours, theirs = rows
    assert ours['infer_ratio_vs_other'] == pytest.approx(ours['infer_imgs_s'] / theirs['infer_imgs_s'])
    assert f'ours / {other}' in capsys.readouterr().out


def test_weights_reach_the_other_implementations():
    """The renamed weights drive timm and transformers to our outputs (checked before timing)."""
    import torch
    from models import create_model
    torch.manual_seed(0)
    ours = create_model('focalnet_large_fl4', embed_dim=16, depths=(1, 1, 2, 1), num_classes=5)
    for make in (benchmark.timm_twin, benchmark.hf_twin):
        twin = make(ours, 0.)
        assert benchmark.check_same_outputs(ours, twin, 64, make.__name__) < 1e-5
        with torch.no_grad():  # a changed weight must change the other model's output
            weight = next(p for n, p in twin.named_parameters() if 'fc1.weight' in n)
            weight.add_(torch.randn_like(weight))
        with pytest.raises(RuntimeError, match='outputs differ'):
            benchmark.check_same_outputs(ours, twin, 64, make.__name__)


@pytest.mark.parametrize('argv,message', [
    (['--table', '--models', 'focalnet_tiny_xyz'], 'focalnet_tiny_xyz'),
    (['--compare', 'timm', '--models', 'focalnet_tiny_iso', '--quick', '--device', 'cpu'],
     'multi-stage'),
    (['--compare', 'timm', '--throughput'], '--throughput goes with --table'),
    (['--compare', 'timm', '--batch-size', '0'], '--batch-size must be at least 1'),
    (['--pipeline', '--data-path', '/nonexistent/folder'], '/nonexistent/folder'),
    (['--pipeline', '--workers', '-1'], '--workers must be 0 or more'),
    (['--pipeline', '--opts', 'AUG.AUTO_AUGMENT'], 'AUG.AUTO_AUGMENT'),
    (['--table', '--device', 'cuda:0', '--throughput'] if not __import__('torch').cuda.is_available()
     else ['--table', '--device', 'nonsense'], 'device'),
])
def test_user_mistakes_are_one_line_errors(argv, message, capsys):
    assert benchmark.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and 'Traceback' not in err


def test_pipeline_times_timm_and_ours_on_photos_and_measures_psnr(tmp_path, capsys):
    # docs/classification.md's smoke command, python tools/benchmark.py --pipeline --quick
    rows = run(tmp_path, '--pipeline', '--quick')
    assert [r['workers'] for r in rows] == [1, 2]
    for r in rows:
        assert r['images_timed'] == 40  # 48 images in batches of 8, the first batch not timed
        assert r['timm_images_per_s_per_core'] > 0 and r['ours_images_per_s_per_core'] > 0
        assert r['ratio'] == r['ours_images_per_s_per_core'] / r['timm_images_per_s_per_core']
        # The fast path as CPU training runs it (every RandAugment op in the worker), timed alongside.
        assert r['ratio_cpu_training'] == r['ours_cpu_training_images_per_s_per_core'] / r['timm_images_per_s_per_core']
        assert r['ratio_gpu_decode'] == r['ours_gpu_decode_images_per_s_per_core'] / r['timm_images_per_s_per_core']
        assert r['ours_cores_needed'] == 8 * 3000 / r['ours_images_per_s_per_core']
        # The same draws: identical up to resampling (tests/test_fast_transform.py bounds it).
        assert r['psnr_db']['crop_flip_erase']['min'] >= 35 and r['psnr_db']['recipe']['images'] == 48
    assert 'images per CPU-second' in capsys.readouterr().out
