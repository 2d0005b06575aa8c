"""Released weights given by path (--pretrained): what is checked before the loader reads them."""
import glob
import json
import os

from errors import UserError


def check_weights_path(path: str):
    """A save_pretrained folder's shard index must name shard files of that folder; checked before
    the loader follows it."""
    if not os.path.isdir(path):
        return
    for index in glob.glob(os.path.join(glob.escape(path), '*.index.json')):
        try:
            with open(index, encoding='utf-8') as f:
                weight_map = json.load(f).get('weight_map')
        except (OSError, ValueError, AttributeError) as e:
            raise UserError(f'{index}: not a readable shard index ({type(e).__name__}: {e})') from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f'{index}: "weight_map" must map tensor names to shard files; got '
                            f'{type(weight_map).__name__}')
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or os.path.basename(shard) != shard or shard in ('.', '..'):
                raise UserError(f'{index}: the shard of {name} is {shard!r}; expected a file name in '
                                f'{path}')
            if not os.path.isfile(os.path.join(path, shard)):
                raise UserError(f'{index}: the shard {shard} of {name} is not in {path}')
