"""What the four example scripts share: their flags, loading the model and the input image, the notebook's
dialogue loop, and printing interleaved outputs as the notebook's `display_interleaved_outputs` shows them.

With no --model-dir an example runs on the embedded default (the miniworld model and retrieval set, built
under runs/embedded-cache if missing) and, with no --image, on the first readable miniworld validation image.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout: use this checkout's code

from PIL import Image  # noqa: E402

from fromage_bench.cli import (_add_model_arguments, _load, configure_output, print_input_error,  # noqa: E402
                               use_embedded_default)
from model.errors import FromageInputError  # noqa: E402
from model.images import SQUASH, open_image, prepare, try_open  # noqa: E402
from model.inference import RETRIEVED_PATH  # noqa: E402
from model.prompts import answer_turn, question_turn  # noqa: E402

INPUT, ANSWER = "Input:     ", "FROMAGe:  "  # the notebook's prefixes


def parse_args(description: str, image: bool, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    _add_model_arguments(parser)
    if image:
        parser.add_argument("--image", type=Path, help="input image (default on the embedded model: the first "
                                                       "miniworld validation image)")
    parser.add_argument("--prompt", action="append", help="use this prompt instead of the example's own (repeat "
                                                          "for several)")
    parser.add_argument("--out", type=Path, help="also save the retrieved images in this directory")
    return parser.parse_args(argv)


def run(main) -> None:
    """`main()`, with output and bad input as `fromage-bench` has them: bad input is one line, exit status 2."""
    configure_output()
    try:
        code = main()
    except FromageInputError as err:
        code = print_input_error(err, Path(sys.argv[0]).name)
    sys.exit(code)


@dataclass
class Example:
    model: object                # model.Fromage
    image: Image.Image | None    # squashed, as the notebook's utils.get_image_from_url does
    prompts: list[str]
    out: Path | None
    saved: int = 0               # retrieved images written to `out` so far

    def show(self, outputs: list) -> None:
        """Strings as they are; an image as its file and size; retrieved images one line each."""
        for item in outputs:
            if isinstance(item, str):
                print(item)
            elif isinstance(item, Image.Image):
                print(f"<image {item.info.get('path', '')} {item.width}x{item.height}>")
            else:
                for rank, image in enumerate(item, 1):
                    print(f"  Retrieval #{rank}: {image.info[RETRIEVED_PATH]} {image.width}x{image.height}"
                          + self._save(image))

    def _save(self, image: Image.Image) -> str:
        if self.out is None:
            return ""
        self.saved += 1
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"retrieved_{self.saved:03d}_{Path(image.info[RETRIEVED_PATH]).stem}.png"
        image.save(path)
        return f", saved as {path}"


def load(args: argparse.Namespace, notebook_prompts: list[str], miniworld_prompts: list[str] | None = None
         ) -> Example:
    """The model, the input image and the prompts of an example. The notebook's prompts are the default;
    `miniworld_prompts`, where given, replace them on the embedded model (a world of coloured shapes)."""
    wants_image = hasattr(args, "image")
    image_path = getattr(args, "image", None)
    image = load_example_image(image_path) if image_path else None  # a bad file fails before the slow load
    embedded = use_embedded_default(args)
    if embedded:
        from fromage_bench.embedded import DEFAULT_WORK

        if wants_image and image is None:
            image = load_example_image(first_miniworld_image(DEFAULT_WORK / "data"))
    elif wants_image and image is None:
        raise FromageInputError("--image", "required with --model-dir",
                                "the notebook's photos are web addresses and nothing is downloaded")
    fromage = _load(args)
    if fromage.retrieval_set is None:
        raise FromageInputError("--retrieval-set", f"required: {args.model_dir} holds no retrieval set and the "
                                "examples retrieve images", "build one with `fromage-bench build-retrieval-set`")
    prompts = args.prompt or (miniworld_prompts if embedded and miniworld_prompts else notebook_prompts)
    return Example(fromage, image, list(prompts), args.out)


def load_example_image(path: Path) -> Image.Image:
    """As the notebook's `utils.get_image_from_url`: squashed to 224x224 (aspect ratio lost), then RGB."""
    image = prepare(open_image(path), SQUASH)
    image.info["path"] = str(path)
    return image


def first_miniworld_image(data_root: Path) -> Path:
    """The first readable image of the miniworld's CC3M-style validation TSV."""
    from fromage_bench.miniworld import CC3M_VAL_IMAGES, CC3M_VAL_TSV
    from tasks.caption_data import load_cc3m

    for item in load_cc3m(data_root / CC3M_VAL_TSV, data_root / CC3M_VAL_IMAGES):
        if try_open(item.path)[0] is not None:
            return item.path
    raise FromageInputError(data_root / CC3M_VAL_TSV, "no readable image", "give one with --image")


# -- the notebook's dialogue -------------------------------------------------------------------------------
def ask(text: str, prompt: str) -> str:
    """The dialogue so far plus a question, as the notebook prompts: `Q: ...\\nA:`."""
    return text + question_turn(prompt)


def answered(text: str, outputs: list) -> str:
    """The dialogue so far plus the model's answer: its strings (with their `[RET]`s) joined by spaces."""
    return text + answer_turn(outputs)


def dialogue(example: Example, ret_scale_factor: float, max_num_rets: int) -> None:
    """The notebook's dialogue loop: each question is sent with the whole conversation before it, after the
    input image if there is one; the model answers in at most 32 words."""
    context = [example.image] if example.image is not None else []
    example.show(context)
    text = ""
    for prompt in example.prompts:
        text = ask(text, prompt)
        outputs = example.model.generate_for_images_and_texts(context + [text], num_words=32,
                                                              ret_scale_factor=ret_scale_factor,
                                                              max_num_rets=max_num_rets)
        text = answered(text, outputs)
        example.show([INPUT + prompt, ANSWER + outputs[0], *outputs[1:]])
