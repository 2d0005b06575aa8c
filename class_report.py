"""Per-class results of the dense tasks, named: an aligned table for the log, and {name: value} maps
for metrics.jsonl in which an undefined value (a class absent from the ground truth) is null."""
import math
from typing import Dict, List, Optional, Sequence


def defined(value) -> Optional[float]:
    """``value`` as a float, or None where it is undefined (None or NaN): JSON has no NaN."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def by_name(names: Sequence[str], values: Sequence) -> Dict[str, Optional[float]]:
    """{class name: value}; a name that repeats gets its index appended, so no value is lost."""
    out: Dict[str, Optional[float]] = {}
    for i, (name, value) in enumerate(zip(names, values)):
        out[name if name not in out else f'{name} ({i})'] = defined(value)
    return out


def table(names: Sequence[str], columns: Dict[str, Sequence], title: str = '') -> str:
    """One row per class: its index, its name and each column's value (percent, one decimal; '-'
    where undefined)."""
    width = max([len('class')] + [len(n) for n in names])
    header = f'{"#":>4}  {"class":<{width}}' + ''.join(f'  {c:>8}' for c in columns)
    lines: List[str] = [title] if title else []
    lines.append(header)
    for i, name in enumerate(names):
        cells = ''.join(f'  {"-" if defined(v[i]) is None else format(v[i], ".1f"):>8}' for v in columns.values())
        lines.append(f'{i:>4}  {name:<{width}}{cells}')
    return '\n'.join(lines)
