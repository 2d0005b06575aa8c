"""Does the fast input path learn as timm's does? The release recipe (RandAugment, erasing, mixup and
cutmix, label smoothing, drop path) through main.py on real photos, shrunk to a CPU run: the same runs
with DATA.FAST_PIPELINE True and False, for several seeds; prints and writes the final and best
validation top-1 of each.

    python tools/pipeline_learning.py --out /tmp/pipeline_learning --json benchmarks/pipeline_learning.json

The data: JPEG crops of the two bundled photos (one class each, data/photos.py), 120-500 px.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.photos import write_photo_folder  # noqa: E402

# A small FocalNet and a short schedule; everything random in the recipe stays on.
SHRUNK = """
DATA: {IMG_SIZE: 64, BATCH_SIZE: 16, NUM_WORKERS: 1, DATASET: folder}
MODEL:
  NAME: shrunk
  DROP_PATH_RATE: 0.1
  FOCAL: {EMBED_DIM: 16, DEPTHS: [1, 1, 2, 1]}
TRAIN: {EPOCHS: 6, WARMUP_EPOCHS: 1, BASE_LR: 2.0e-3}
PRINT_FREQ: 1000
"""


def run(cfg: Path, data: Path, out: Path, seed: int, fast: bool) -> dict:
    tag = f'{"fast" if fast else "timm"}_seed{seed}'
    args = [sys.executable, 'main.py', '--cfg', str(cfg), '--data-path', str(data), '--output', str(out),
            '--tag', tag, '--opts', 'SEED', str(seed), 'DATA.FAST_PIPELINE', str(fast)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f'{tag} failed:\n{done.stderr[-3000:]}')
    rows = [json.loads(line) for line in (out / 'shrunk' / tag / 'metrics.jsonl').read_text().splitlines()]
    epochs = [r for r in rows if 'acc1' in r and 'train_loss' in r]
    return {'path': 'fast' if fast else 'timm', 'seed': seed, 'final_acc1': epochs[-1]['acc1'],
            'best_acc1': max(r['acc1'] for r in epochs), 'final_train_loss': epochs[-1]['train_loss']}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', type=Path, required=True, help='folder for the data and the runs')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--train', type=int, default=192, help='training images')
    p.add_argument('--val', type=int, default=96, help='validation images')
    p.add_argument('--json', type=Path, help='write the rows as JSON')
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = write_photo_folder(args.out / 'data', args.train, args.val, seed=1)
    cfg = args.out / 'shrunk.yaml'
    cfg.write_text(SHRUNK)
    rows = []
    for seed in args.seeds:
        for fast in (True, False):
            rows.append(run(cfg, data, args.out / 'runs', seed, fast))
            print(rows[-1], flush=True)
    for path in ('fast', 'timm'):
        final = [r['final_acc1'] for r in rows if r['path'] == path]
        loss = [r['final_train_loss'] for r in rows if r['path'] == path]
        print(f'{path}: final top-1 {statistics.mean(final):.1f} +- {statistics.pstdev(final):.1f} '
              f'(seeds {", ".join(f"{a:.1f}" for a in final)}); final train loss '
              f'{statistics.mean(loss):.3f} +- {statistics.pstdev(loss):.3f}')
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
