"""metrics.jsonl: one JSON record per line, appended durably; a resumed run rewrites its future."""
import json
import os


def append_metrics(path: str, record: dict):
    with open(path, 'a') as f:
        f.write(json.dumps(record) + '\n')
        f.flush()
        os.fsync(f.fileno())


def drop_metrics_from(path: str, position: int, key: str = 'epoch'):
    """Forget training records whose ``key`` (epoch, or iteration for iteration-based runs) is
    ``position`` or later: a resumed run writes them again. Evaluation records stay."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]

    def keep(line: str) -> bool:
        try:
            record = json.loads(line)
        except ValueError:  # the last line of a run killed while writing it
            return False
        return record.get('mode') == 'eval' or record.get(key, -1) < position

    kept = [line if line.endswith('\n') else line + '\n' for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path + '.tmp'
        with open(tmp, 'w') as f:
            f.writelines(kept)
        os.replace(tmp, path)
