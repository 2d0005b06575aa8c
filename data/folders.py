"""Listing the images of a class-folder tree (``root/<class>/.../<image>``) without surprises.

torchvision's listing follows symbolic links without noticing loops (a link back to a parent folder
multiplies its images, and a link to another class folder relabels them), takes FIFOs and device files
with an image name for images (reading a FIFO waits for ever), and says nothing of empty class
folders. Here each folder and each file is listed once, the order is torchvision's (so sample
indices do not change), and:

- a folder reached twice (a link loop, or a link to another folder of the set) is an error naming
  both paths, as is a file reached twice through links;
- a name with an image extension that is not a regular file (FIFO, socket, device, broken link) is
  passed over with a warning naming it;
- class folders without an image are named in a warning.
"""
import logging
import os
import stat
from typing import Dict, List, Tuple

from torchvision.datasets.folder import IMG_EXTENSIONS

from errors import UserError
from models.state_fit import listing

logger = logging.getLogger('focalnet')


def find_images(root: str, class_to_idx: Dict[str, int],
                extensions: Tuple[str, ...] = IMG_EXTENSIONS) -> List[Tuple[str, int]]:
    """(path, class index) of every image under ``root/<class>`` for the classes given."""
    samples: List[Tuple[str, int]] = []
    folders: Dict[Tuple[int, int], str] = {}      # (device, inode) -> the path it was first reached by
    linked: List[Tuple[str, str]] = []            # (real target, path) of linked files
    real_folders: Dict[str, str] = {}             # path -> real path, for the linked-file check
    not_files: List[str] = []
    empty: List[str] = []
    for name in sorted(class_to_idx):
        found = []
        _walk(os.path.join(root, name), folders, found, linked, not_files, extensions)
        found.sort()  # by folder, then file name: torchvision's order
        samples += [(os.path.join(folder, file), class_to_idx[name]) for folder, file in found]
        real_folders.update({folder: os.path.realpath(folder) for folder, _ in found})
        if not found:
            empty.append(name)
    if linked:
        _check_linked_files(samples, linked, real_folders)
    if not_files:
        logger.warning(f'{root}: passing over {len(not_files)} name(s) with an image extension that are '
                       f'not regular files (FIFOs, sockets, devices or broken links): {listing(not_files)}')
    if empty:
        logger.warning(f'{root}: {len(empty)} class folder(s) without images: {listing(empty)} (their '
                       f'classes keep their indices but have no examples here)')
    return samples


def _walk(folder: str, folders: dict, found: list, linked: list, not_files: list, extensions):
    try:
        info = os.stat(folder)
    except OSError as e:
        raise UserError(f'cannot read the data folder {folder}: {e.strerror or e}') from None
    key = (info.st_dev, info.st_ino)
    if key in folders:
        raise UserError(f'{folder} is the folder {folders[key]} again (through a symbolic link): '
                        f'its images would be counted twice, under two paths or two classes; '
                        f'remove the link')
    folders[key] = folder
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise UserError(f'cannot read the data folder {folder}: {e.strerror or e}') from None
    for entry in entries:
        try:
            is_dir = entry.is_dir()  # follows links
        except OSError:
            is_dir = False
        if is_dir:
            _walk(entry.path, folders, found, linked, not_files, extensions)
            continue
        if not entry.name.lower().endswith(extensions):
            continue
        try:
            # The directory entry's type, without a stat call unless the name is a link.
            regular = stat.S_ISREG(entry.stat().st_mode) if entry.is_symlink() else entry.is_file(follow_symlinks=False)
        except OSError:  # a broken link
            regular = False
        if not regular:
            not_files.append(entry.path)
            continue
        if entry.is_symlink():
            linked.append((os.path.realpath(entry.path), entry.path))
        found.append((folder, entry.name))


def _check_linked_files(samples, linked, real_folders):
    """A linked file must not be an image the set already holds (or another link to the same one)."""
    target = {path: real for real, path in linked}
    first: Dict[str, str] = {}
    for path, _ in samples:
        folder, name = os.path.split(path)
        real = target.get(path) or os.path.join(real_folders[folder], name)
        if real in first:
            raise UserError(f'{path} and {first[real]} are the same image file (through a symbolic '
                            f'link): it would be counted twice; remove the link')
        first[real] = path
