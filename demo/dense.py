"""The demo page's second tab: a detector or a segmentor from a checkpoint, run on an image.

A checkpoint of ``python -m detection`` or ``python -m segmentation`` carries its config; a released
UPerNet file needs its config file too. The detections (boxes, masks, "class score" labels) or the
predicted classes are drawn by the same functions as ``python -m detection.predict`` and
``python -m segmentation.predict``, and listed in a table.
"""
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from PIL import Image

from errors import UserError

TASKS = ('detection', 'segmentation')


@dataclass
class DenseModel:
    key: tuple
    task: str
    checkpoint: str
    config: object
    model: torch.nn.Module
    names: List[str]


@dataclass
class DenseResult:
    drawn: Image.Image
    rows: List[list]        # detection: [class, score, x1, y1, x2, y2]; segmentation: [class, share %]
    status: str             # Markdown: model, weights, what was found
    seconds: float


class DenseDemo:
    """One loaded detector or segmentor at a time, kept until another is asked for."""

    def __init__(self, device: str = 'cpu'):
        self.device = torch.device(device)
        self._loaded: Optional[DenseModel] = None
        self._lock = threading.Lock()

    def load(self, task: str, checkpoint: str, cfg: str = '') -> DenseModel:
        if task not in TASKS:
            raise UserError(f'unknown task {task!r}; choose detection or segmentation')
        checkpoint, cfg = (checkpoint or '').strip(), (cfg or '').strip() or None
        if not checkpoint:
            raise UserError(f'no checkpoint: give the path of a {task} checkpoint on this machine')
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise UserError(f'checkpoint not found: {checkpoint}')
        if cfg and not Path(cfg).is_file():
            raise UserError(f'config file not found: {cfg}')
        stat = path.stat()
        key = (task, str(path.resolve()), stat.st_mtime_ns, stat.st_size, cfg)
        with self._lock:
            if self._loaded is not None and self._loaded.key == key:
                return self._loaded
            self._loaded = None
            if task == 'detection':
                from detection.predict import load_detector
                config, model, _, names = load_detector(str(path), cfg, [], self.device)
            else:
                from segmentation.classes import class_names
                from segmentation.predict import load_segmentor
                config, model = load_segmentor(str(path), cfg, [], self.device)
                names = class_names(config)
            self._loaded = DenseModel(key, task, checkpoint, config, model, names)
            return self._loaded

    @torch.inference_mode()
    def run(self, task: str, checkpoint: str, cfg: str, image: Optional[Image.Image],
            score_thresh: float = 0.3) -> DenseResult:
        start = time.perf_counter()
        if image is None:
            raise UserError('no image: upload one or pick an example')
        if not 0 <= float(score_thresh) <= 1:
            raise UserError(f'score threshold {score_thresh} is out of range; use 0 to 1')
        loaded = self.load(task, checkpoint, cfg)
        pixels = torch.from_numpy(__import__('numpy').array(image.convert('RGB'))).permute(2, 0, 1).contiguous()
        if task == 'detection':
            drawn, rows, found = self._detect(loaded, pixels, float(score_thresh))
        else:
            drawn, rows, found = self._segment(loaded, pixels)
        seconds = time.perf_counter() - start
        status = (f'**{loaded.config.MODEL.NAME}** ({task}) · weights `{loaded.checkpoint}` · '
                  f'{pixels.shape[2]}x{pixels.shape[1]} px · {found} · answered in {seconds:.1f} s')
        return DenseResult(drawn, rows, status, seconds)

    def _detect(self, loaded: DenseModel, pixels: torch.Tensor, score_thresh: float) -> Tuple[Image.Image, list, str]:
        from tools.dense_predict import OBJECT_COLOURS, draw_detections
        output = {k: v.cpu() for k, v in loaded.model([pixels.to(self.device).float() / 255])[0].items()}
        drawn = draw_detections(pixels, output, loaded.names, OBJECT_COLOURS, score_thresh)
        keep = output['scores'] >= score_thresh
        rows = [[loaded.names[int(label) - 1], round(float(score), 4), *[round(float(v), 1) for v in box]]
                for label, score, box in zip(output['labels'][keep], output['scores'][keep], output['boxes'][keep])]
        return drawn, rows, f'{len(rows)} detections of score ≥ {score_thresh:g}'

    def _segment(self, loaded: DenseModel, pixels: torch.Tensor) -> Tuple[Image.Image, list, str]:
        from segmentation.classes import palette
        from segmentation.inference import predict
        from segmentation.train import inference_options
        from tools.dense_predict import draw_segmentation
        pred = predict(loaded.model, pixels[None].to(self.device), **inference_options(loaded.config, False))[0].cpu()
        drawn = draw_segmentation(pixels, pred, palette(loaded.config.MODEL.NUM_CLASSES))
        counts = torch.bincount(pred.flatten(), minlength=len(loaded.names))
        order = counts.argsort(descending=True).tolist()
        rows = [[loaded.names[c], round(100 * int(counts[c]) / pred.numel(), 2)] for c in order if counts[c] > 0]
        return drawn, rows, f'{len(rows)} classes'


def build_tab(dense: DenseDemo, examples: List[Path], checkpoint: str = '', task: str = 'detection'):
    """The tab's components, inside the caller's gr.Blocks / gr.Tab; its run is the API endpoint
    ``/dense``."""
    import gradio as gr

    def run(task, ckpt, cfg, image, thresh):
        try:
            result = dense.run(task, ckpt, cfg, image, thresh)
        except UserError as e:
            raise gr.Error(str(e), print_exception=False) from None
        import pandas as pd  # gradio's own dependency: a table with its headers in one value
        headers = (['class', 'score', 'x1', 'y1', 'x2', 'y2'] if task == 'detection' else ['class', 'share %'])
        return result.drawn, pd.DataFrame(result.rows, columns=headers), result.status

    gr.Markdown('A detector or a segmentor trained with `python -m detection` / `python -m segmentation` '
                '(its checkpoint carries its config), or a released UPerNet with its config file.')
    with gr.Row():
        with gr.Column(scale=2):
            task_box = gr.Radio(list(TASKS), value=task, label='Task', elem_id='dense-task')
            ckpt = gr.Textbox(checkpoint, label='Checkpoint (a path on this machine)', elem_id='dense-checkpoint')
            cfg = gr.Textbox('', label='Config file (only for a file without one, e.g. a released UPerNet)',
                             elem_id='dense-config')
            image = gr.Image(type='pil', image_mode='RGB', sources=['upload', 'clipboard'], label='Image',
                             elem_id='dense-image')
            gr.Examples([[str(p)] for p in examples], inputs=[image], label='Examples')
            thresh = gr.Slider(0, 1, value=0.3, step=0.05, label='Score threshold (detection)',
                               elem_id='dense-threshold')
            button = gr.Button('Run', variant='primary', elem_id='dense-run')
        with gr.Column(scale=3):
            status = gr.Markdown(elem_id='dense-status')
            drawn = gr.Image(type='pil', format='png', label='Prediction', elem_id='dense-drawn',
                             buttons=['download', 'fullscreen'])
            table = gr.Dataframe(headers=['class', 'score', 'x1', 'y1', 'x2', 'y2'], label='Found',
                                 elem_id='dense-table', interactive=False)
    button.click(run, inputs=[task_box, ckpt, cfg, image, thresh], outputs=[drawn, table, status],
                 api_name='dense', concurrency_limit=1)
