"""A local web page that shows what a FocalNet's focal modulation sees in an image.

    python demo/app.py [--checkpoint PATH] [--model NAME] [--cfg FILE ...] [--port 7860]

Pick an architecture (any of the fifteen releases, or a config given with --cfg), a checkpoint (a
path on this machine, in any layout models.load_pretrained reads; none gives random weights and a
warning), and an image; the page shows the top-5 classes, the modulator's magnitude laid over the
image for the chosen blocks, the gates of every focal level and of the global context for one
block, and the depth-wise kernels of each stage.

The numbers come from ``FocalNet.modulation_maps`` and the figures from tools/visualize.py's drawing
functions: this file only connects them to the page. The page is served on 127.0.0.1 unless --host
says otherwise, and neither it nor the server fetches anything from the network: gradio's analytics
are off, there is no share link, and the theme uses the system's fonts.
"""
import argparse
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ''):
    # Run as a script (python demo/app.py): make the repository's packages importable.
    sys.path.insert(0, str(ROOT))

# Before gradio is imported: no usage reports, and no telemetry from huggingface_hub, which it uses.
os.environ.setdefault('GRADIO_ANALYTICS_ENABLED', 'False')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')

import torch
from PIL import Image

from config import load_config
from data import build_transform
from data.files import file_problem, not_regular
from errors import UserError
from models import list_models
from models.pretrained import CheckpointError, convert_state_dict, extract_state_dict, read_state_file
from tools.loading import device_from_flag
from tools.visualize import (BlockId, ModulationArrays, class_names, figure_image, kernel_maps,
                             load_model, modulation_arrays, plot_gating, plot_kernels,
                             plot_modulator, prepare_images, resolve_block)

logger = logging.getLogger('focalnet.demo')

TOP_K = 5
IMAGE_NAME = 'your image'  # the row title of the figures
DEFAULT_MODEL = 'focalnet_tiny_srf'


# ---- what the page computes --------------------------------------------------------------------
def block_label(block: BlockId) -> str:
    return f'stage {block[0]} block {block[1]}'


def parse_block(label: str) -> BlockId:
    found = re.fullmatch(r'\s*stage\s+(-?\d+)\s+block\s+(-?\d+)\s*', str(label))
    if not found:
        raise UserError(f'bad block {label!r}; write it as "stage S block B", e.g. "stage 3 block 1"')
    return int(found.group(1)), int(found.group(2))


def sample_photos() -> List[Path]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg), the page's examples."""
    from sklearn.datasets import load_sample_images
    return [Path(p) for p in load_sample_images().filenames]


def checkpoint_classes(path: str) -> int:
    """How many classes the classifier in a checkpoint has; 0 for a backbone without one."""
    state = extract_state_dict(read_state_file(path, mmap=True), str(path))
    state, _ = convert_state_dict(state)
    head = state.get('head.weight')
    return 0 if head is None else int(head.shape[0])


def checkpoint_path_problem(checkpoint: str, path: Path) -> Optional[str]:
    """Why ``path`` cannot be read as a checkpoint, from its kind alone (nothing is opened), or None."""
    if path.is_dir():  # a Hugging Face folder (save_pretrained)
        return None if os.access(path, os.R_OK | os.X_OK) else f'{checkpoint}: permission denied'
    problem = not_regular(str(path))
    if problem == 'not found':
        return f'checkpoint not found: {checkpoint}'
    if problem:
        return f'{checkpoint} is {problem}, not a checkpoint file'
    if not os.access(path, os.R_OK):
        return f'{checkpoint}: permission denied'
    return None


def misfit(config, path: str) -> str:
    """Which of the architecture's parameters a checkpoint lacks or holds in another shape, named by
    the architecture's own parameter names; the file's other entries are counted, not named."""
    from models import build_model
    try:
        state, _ = convert_state_dict(extract_state_dict(read_state_file(path, mmap=True), path))
    except CheckpointError:
        return ''
    target = {k: v.shape for k, v in build_model(config).state_dict().items()}
    missing = [k for k in target if k not in state]
    reshaped = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k])]
    extra = sum(k not in target for k in state)
    parts = [f'{len(names)} {what}: {", ".join(names[:3])}{" ..." if len(names) > 3 else ""}'
             for names, what in ((missing, 'of its parameters missing'), (reshaped, 'of another shape')) if names]
    if extra:
        parts.append(f'{extra} entries it has no parameter for')
    return f' ({"; ".join(parts)})' if parts else ''


@dataclass
class Loaded:
    """A model with its weights, and what the page says about it."""
    key: tuple
    architecture: str
    checkpoint: str                 # '' for random weights
    layout: Optional[str]           # the checkpoint's layout (official, timm, hf)
    config: object                  # the frozen config the model was built from
    model: torch.nn.Module
    classes: Optional[Tuple[str, ...]]  # ImageNet names, or None (class indices)
    kernels: Optional[Image.Image] = None  # drawn once per model: it depends on the weights only


@dataclass
class Analysis:
    """What the page shows for one image."""
    top: Dict[str, float]           # the top-5 classes and their probabilities, most likely first
    modulator: Image.Image
    gating: Image.Image
    kernels: Image.Image
    status: str                     # Markdown: model, weights, and warnings
    random_weights: bool
    seconds: float
    arrays: ModulationArrays        # the numbers behind the figures


class Demo:
    """The model behind the page: architectures by name, one loaded model at a time."""

    def __init__(self, architectures: Dict[str, Path], device: str = 'cpu'):
        self.architectures = dict(architectures)
        self.device = torch.device(device)
        self._loaded: Optional[Loaded] = None
        self._lock = threading.Lock()  # requests run in threads; one model is built at a time

    def config(self, architecture: str, num_classes: Optional[int] = None,
               img_size: Optional[int] = None):
        if architecture not in self.architectures:
            raise UserError(f'unknown architecture {architecture!r}; choose one of '
                            f'{", ".join(self.architectures)}')
        opts = []
        if num_classes is not None:
            opts += ['MODEL.NUM_CLASSES', str(num_classes)]
        if img_size is not None:
            opts += ['DATA.IMG_SIZE', str(img_size)]
        return load_config(str(self.architectures[architecture]), opts)

    def blocks(self, architecture: str) -> Tuple[List[str], List[str], str, int]:
        """Every block of the architecture, the default modulator blocks (the last of each stage),
        the default gate block (the last), and the config's resolution; read from the config, so
        that nothing is built."""
        config = self.config(architecture)
        depths = list(config.MODEL.FOCAL.DEPTHS)
        every = [block_label((s, b)) for s, d in enumerate(depths) for b in range(d)]
        last = [block_label((s, d - 1)) for s, d in enumerate(depths)]
        return every, last, last[-1], int(config.DATA.IMG_SIZE)

    def load(self, architecture: str, checkpoint: str = '') -> Loaded:
        """The architecture with the checkpoint's weights (random without one), kept until another
        architecture or checkpoint is asked for. Errors name the path and the kind of problem only:
        the page may be open to people who must not learn what other files on the machine hold."""
        checkpoint = (checkpoint or '').strip()
        self.config(architecture)  # names a bad architecture before anything is read
        if checkpoint:
            path = Path(checkpoint).expanduser()
            problem = checkpoint_path_problem(checkpoint, path)
            if problem:
                raise UserError(problem)
            stat = path.stat()
            key = (architecture, str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        else:
            path, key = None, (architecture, '')
        with self._lock:
            if self._loaded is not None and self._loaded.key == key:
                return self._loaded
            self._loaded = None  # let the old model go before the new one is built
            try:
                # The checkpoint says how many classes it has: the 22K releases and their
                # fine-tunes share architectures.
                num_classes = checkpoint_classes(str(path)) if path else None
            except CheckpointError as e:
                logger.warning('%s', e)  # the details, for whoever runs the server
                raise UserError(f'{checkpoint}: not a checkpoint this page reads (a PyTorch or safetensors '
                                f'file of FocalNet weights)') from None
            try:
                config = self.config(architecture, num_classes=num_classes)
                model, info = load_model(config, str(path) if path else None)
            except CheckpointError as e:
                logger.warning('%s', e)
                raise UserError(f'{checkpoint}: its weights do not fit {architecture}'
                                f'{misfit(config, str(path))}') from None
            model = model.to(self.device).eval()
            self._loaded = Loaded(key, architecture, checkpoint, info and info['layout'], config,
                                  model, class_names(model.num_classes))
            return self._loaded

    def analyse(self, architecture: str, checkpoint: str, image: Optional[Image.Image],
                modulator_blocks: Sequence[str] = (), gate_block: Optional[str] = None,
                resolution: Optional[int] = None) -> Analysis:
        """Everything the page shows for ``image``: block names as "stage S block B"; no gate block
        means the last block, no resolution the config's."""
        start = time.perf_counter()
        if image is None:
            raise UserError('no image: upload one or pick an example')
        if resolution is not None and not 32 <= int(resolution) <= 2048:
            raise UserError(f'resolution {resolution} px is out of range; use 32 to 2048')
        loaded = self.load(architecture, checkpoint)
        config = self.config(architecture, num_classes=loaded.config.MODEL.NUM_CLASSES,
                             img_size=None if resolution is None else int(resolution))
        batch, display = prepare_images([image.convert('RGB')], build_transform(False, config))
        return self.explain(loaded, batch, display[0], modulator_blocks, gate_block, start)

    def explain(self, loaded: Loaded, batch: torch.Tensor, display, modulator_blocks: Sequence[str],
                gate_block: Optional[str], start: Optional[float] = None) -> Analysis:
        """``analyse`` for an image already transformed: ``batch`` (1, 3, H, W) normalised, and
        ``display`` the (H, W, 3) picture the model sees."""
        start = time.perf_counter() if start is None else start
        model = loaded.model
        gate = resolve_block(model, parse_block(gate_block) if gate_block else (-1, -1))
        blocks = [resolve_block(model, parse_block(b)) for b in modulator_blocks]
        arrays = modulation_arrays(model, batch.to(self.device), [gate, *blocks])
        names = [IMAGE_NAME]
        modulator = figure_image(plot_modulator([display], arrays, blocks, names,
                                                classes=loaded.classes)[0])
        gating = figure_image(plot_gating([display], arrays, gate, names,
                                          classes=loaded.classes)[0])
        if loaded.kernels is None:
            loaded.kernels = figure_image(plot_kernels(kernel_maps(model))[0])
        top = self.top_classes(arrays.logits, loaded.classes)
        seconds = time.perf_counter() - start
        return Analysis(top, modulator, gating, loaded.kernels, self.status(loaded, batch, seconds),
                        not loaded.checkpoint, seconds, arrays)

    @staticmethod
    def top_classes(logits: Optional[torch.Tensor], classes: Optional[Sequence[str]]
                    ) -> Dict[str, float]:
        """The ``TOP_K`` most likely classes of the first image, by name (else "class i")."""
        if logits is None:
            return {}
        p = logits[0].float().softmax(-1)
        values, indices = p.topk(min(TOP_K, p.numel()))
        return {(classes[i] if classes else f'class {i}'): float(v)
                for v, i in zip(values.tolist(), indices.tolist())}

    @staticmethod
    def status(loaded: Loaded, batch: torch.Tensor, seconds: float) -> str:
        model = loaded.model
        size = 'x'.join(str(s) for s in batch.shape[-2:])
        if model.num_classes == 0:
            classes = 'no classifier in this checkpoint (a backbone): no classes to show'
        elif loaded.classes:
            classes = f'{model.num_classes} classes with ImageNet names'
        else:
            classes = f'{model.num_classes} classes, by index'
        if loaded.checkpoint:
            weights = f'weights `{loaded.checkpoint}` ({loaded.layout} layout)'
        else:
            weights = ('**random weights: no checkpoint given.** The classes and maps show nothing '
                       'learned; give a checkpoint to see what the model learned.')
        text = (f'**{loaded.architecture}** · {classes} · {size} px · answered in {seconds:.1f} s'
                f'\n\n{weights}')
        return f'⚠️ {text}' if not loaded.checkpoint else text


# ---- the page ----------------------------------------------------------------------------------
def architectures(configs: Sequence[str] = ()) -> Dict[str, Path]:
    """The fifteen releases by name (configs/<name>.yaml), then each ``configs`` file by its stem;
    a file named like a release takes its place."""
    table = {name: ROOT / 'configs' / f'{name}.yaml' for name in list_models()}
    for cfg in configs:
        path = Path(cfg)
        if not_regular(cfg) == 'not found':
            raise UserError(f'config file not found: {cfg}')  # the wording of every other entry point
        problem = file_problem(cfg, 'config')
        if problem:
            raise UserError(problem)
        load_config(str(path))  # names a bad key now, not at the first request
        table[path.stem] = path
    return table


def theme():
    """gradio's default look with the system's fonts: nothing to fetch."""
    import gradio as gr
    return gr.themes.Default(font=['ui-sans-serif', 'system-ui', 'sans-serif'],
                             font_mono=['ui-monospace', 'monospace'])


def build_page(demo: Demo, architecture: str = DEFAULT_MODEL, checkpoint: str = ''):
    """The gradio page: inputs on the left, results on the right; the run is also the API
    endpoint ``/analyse`` (gradio_client)."""
    import gradio as gr

    every, last, gate, size = demo.blocks(architecture)

    def run(arch, ckpt, image, blocks, gate_block, resolution):
        try:
            result = demo.analyse(arch, ckpt, image, blocks or [], gate_block or None,
                                  None if resolution in (None, '') else int(resolution))
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        if result.random_weights:
            gr.Warning('No checkpoint: random weights. The classes and maps show nothing learned.')
        return result.top, result.modulator, result.gating, result.kernels, result.status

    def choose(arch):
        try:
            every, last, gate, size = demo.blocks(arch)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return (gr.update(choices=every, value=last), gr.update(choices=every, value=gate),
                gr.update(value=size))

    # Result images go to gradio's cache folder; delete_cache removes those older than an hour.
    with gr.Blocks(title='FocalNet: what focal modulation sees', analytics_enabled=False,
                   delete_cache=(3600, 3600)) as page:
        gr.Markdown('## FocalNet: what focal modulation sees\n'
                    'The top-5 classes, the modulator laid over the image, the gates of every focal '
                    'level and the depth-wise kernels, from the model\'s own forward pass.')
        with gr.Row():
            with gr.Column(scale=2):
                arch = gr.Dropdown(list(demo.architectures), value=architecture,
                                   label='Architecture', elem_id='architecture')
                ckpt = gr.Textbox(checkpoint, label='Checkpoint (a path on this machine)',
                                  placeholder='.pth / .bin / .safetensors file or a save_pretrained '
                                  'folder; empty: random weights', elem_id='checkpoint')
                image = gr.Image(type='pil', image_mode='RGB', sources=['upload', 'clipboard'],
                                 label='Image', elem_id='image', buttons=['fullscreen'])
                gr.Examples([[str(p)] for p in sample_photos()], inputs=[image],
                            label='Examples (scikit-learn\'s sample photos)')
                with gr.Accordion('Blocks and resolution', open=False):
                    # Custom values pass through to the function, which names a block that does
                    # not exist: the choices follow the architecture, an API caller may not.
                    blocks = gr.Dropdown(every, value=last, multiselect=True, allow_custom_value=True,
                                         label='Modulator: blocks to show', elem_id='blocks')
                    gate_block = gr.Dropdown(every, value=gate, allow_custom_value=True,
                                             label='Gates: block', elem_id='gate-block')
                    resolution = gr.Number(size, precision=0, minimum=32, maximum=2048,
                                           label='Resolution (px)', elem_id='resolution')
                button = gr.Button('Run', variant='primary', elem_id='run')
            with gr.Column(scale=3):
                status = gr.Markdown(elem_id='status')
                top = gr.Label(num_top_classes=TOP_K, label='Top-5 classes', elem_id='top5')
                # The figures carry their own titles.
                figure = dict(type='pil', format='png', show_label=False,
                              buttons=['download', 'fullscreen'])
                modulator = gr.Image(label='Modulator magnitude', elem_id='modulator', **figure)
                gating = gr.Image(label='Gates of every focal level', elem_id='gating', **figure)
                kernels = gr.Image(label='Depth-wise kernels per stage', elem_id='kernels', **figure)
        arch.change(choose, inputs=arch, outputs=[blocks, gate_block, resolution],
                    api_visibility='private')
        button.click(run, inputs=[arch, ckpt, image, blocks, gate_block, resolution],
                     outputs=[top, modulator, gating, kernels, status], api_name='analyse',
                     concurrency_limit=1)
    return page


def build_app(demo: Demo, dense, architecture: str = DEFAULT_MODEL, checkpoint: str = '',
              dense_checkpoint: str = '', dense_task: str = 'detection'):
    """The page of build_page as a first tab, and a second for a detector or a segmentor
    (demo/dense.py; API endpoint ``/dense``)."""
    import gradio as gr
    from demo.dense import build_tab
    page = build_page(demo, architecture, checkpoint)
    with gr.Blocks(title=page.title, analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        with gr.Tab('Focal modulation', id='modulation', elem_id='tab-modulation'):
            page.render()
        with gr.Tab('Detection and segmentation', id='dense', elem_id='tab-dense'):
            build_tab(dense, sample_photos(), dense_checkpoint, dense_task)
    return app


def launch(page, host: str = '127.0.0.1', port: int = 7860, block: bool = True):
    """Serve the page on host:port, with nothing that reaches outside: no share link, no server-side
    rendering process, no monitoring, system fonts."""
    return page.launch(server_name=host, server_port=port, share=False, ssr_mode=False, pwa=False,
                       mcp_server=False, enable_monitoring=False, show_error=True, quiet=False,
                       footer_links=['api'], prevent_thread_lock=not block, theme=theme())


# ---- command line ------------------------------------------------------------------------------
def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='demo/app.py',
        description='A local web page showing what a FocalNet\'s focal modulation sees.')
    parser.add_argument('--checkpoint', default='',
                        help='weights to start with, in any layout models.load_pretrained reads '
                        '(official, timm, Hugging Face); default: none, random weights')
    parser.add_argument('--model', help=f'architecture to start with (default: {DEFAULT_MODEL}, '
                        'or the first --cfg)')
    parser.add_argument('--cfg', action='append', default=[], metavar='FILE',
                        help='a model config (YAML) to offer besides the releases, named by its '
                        'file name; repeatable')
    parser.add_argument('--host', default='127.0.0.1',
                        help='address to serve on (default: 127.0.0.1, this machine only)')
    parser.add_argument('--port', type=int, default=7860, help='port (default: 7860)')
    parser.add_argument('--device', default='cpu', help='device to run the model on (default: cpu)')
    parser.add_argument('--dense-checkpoint', default='', metavar='PATH',
                        help='a detector or segmentor checkpoint for the "Detection and segmentation" '
                        'tab (python -m detection / python -m segmentation)')
    parser.add_argument('--dense-task', choices=['detection', 'segmentation'], default='detection',
                        help='what --dense-checkpoint is (default: detection)')
    return parser.parse_args(argv)


def setup(args: argparse.Namespace) -> Tuple[Demo, object]:
    """The demo and its page from the command line; the first model is loaded now, so that a bad
    checkpoint is named before the page is served."""
    device_from_flag(args.device)  # a bad --device is named before anything is loaded
    if not 0 < args.port < 65536:
        raise UserError(f'--port {args.port} is not a port number (1 to 65535)')
    demo = Demo(architectures(args.cfg), device=args.device)
    architecture = args.model or (Path(args.cfg[0]).stem if args.cfg else DEFAULT_MODEL)
    demo.load(architecture, args.checkpoint)
    from demo.dense import DenseDemo
    dense = DenseDemo(device=args.device)
    if args.dense_checkpoint:
        dense.load(args.dense_task, args.dense_checkpoint)  # a bad checkpoint is named before serving
    return demo, build_app(demo, dense, architecture, args.checkpoint, args.dense_checkpoint, args.dense_task)


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    args = parse_args(argv)
    try:
        _, page = setup(args)
        launch(page, args.host, args.port)
    except UserError as e:
        print(f'demo/app.py: error: {e}', file=sys.stderr)
        return 2
    except OSError as e:  # the port is taken, or the address is not this machine's
        print(f'demo/app.py: error: cannot serve on {args.host}:{args.port}: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
