"""`fromage-bench demo`: the original FROMAGe Gradio chat (`demo/app.py`), on the current Gradio.

    fromage-bench demo [--model-dir DIR --retrieval-set DIR] [--host 127.0.0.1] [--port 7860] [model flags]

Behaviour kept from the original demo:
* the model sees the whole conversation each turn: uploaded images (squashed to 224x224, then RGB) and
  strings, each question sent as ``'Q: ' + text + '\\nA:'`` and each answer's text appended, joined by spaces,
  with ``'\\n'``;
* an upload adds the image and an empty string to that history; Undo drops the last shown entry and the last
  two history items (an upload, or a question and its answer); Reset empties both;
* ``num_words=max(max_words, 1)``, ``top_p=0.95`` when the temperature is above 0 (else 1.0), the "max images"
  control is ``max_num_rets``; ``[RET]`` is removed from the shown text, retrieved images are shown inline.

The conversation logic is plain functions on a `Conversation` (testable without a server); `build_demo` is the
thin Gradio layer over them. Nothing is downloaded: analytics and the version check are off, the theme uses
system fonts, sharing is off, and the server binds 127.0.0.1 unless `--host` says otherwise.
"""
from __future__ import annotations

import base64
import hashlib
import html
import io
import logging
import os
import socket
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Union

from PIL import Image

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD_BYTES = 20 * 1024 * 1024   # a phone photo is a few MB; the model sees 224x224 anyway
MAX_UPLOAD_PIXELS = 40_000_000        # checked from the header, before the image is decoded
MAX_TEXT_CHARS = 2000                 # per message
TOP_P_WHEN_SAMPLING = 0.95            # the original's nucleus when temperature > 0
# The initial ret_scale_factor when serving the embedded default. Its small stand-in LM ranks "[RET]" second after
# an answer (behind " Q", the start of another round in its pretraining dialogues), where OPT-6.7B ranks it
# first. Requests about an uploaded miniworld image ("show me a picture like this", "what do you see?", ...)
# retrieved on 0 of 18 tries at 1.0, 7 at 1.3 (the notebook's dialogue value), 12 at 1.5, 13 at 2.0.
EMBEDDED_RET_SCALE_FACTOR = 1.5
# The original example notebook's prompts (concept composition, the beaver dialogue, the photo dialogue).
EXAMPLE_PROMPTS = [
    "watercolor drawing [RET]",
    "I am thinking of an animal. It is brown and furry, and has a tail. What is it?",
    "Show me an illustration of a beaver",
    "What is this image?",
    "Is the image in color?",
]

Part = Union[str, Image.Image]  # a piece of a shown answer: text (without [RET]) or a retrieved image


class DemoInputError(ValueError):
    """An upload or a message outside the demo's bounds; the message says which bound, for the user."""


@dataclass(frozen=True)
class Entry:
    """One shown entry of the chat: an uploaded image, or a question with its answer's parts."""
    image: Image.Image | None = None
    question: str | None = None
    answer: tuple[Part, ...] = ()


@dataclass(frozen=True)
class Conversation:
    """What is shown (`entries`) and what the model is sent (`history`: PIL images and strings), as the
    original demo's `[conversation, chat_history]` state. Each entry added two history items."""
    entries: tuple[Entry, ...] = ()
    history: tuple[Part, ...] = ()


@dataclass(frozen=True)
class Controls:
    """The sliders, as the model's decoding arguments."""
    ret_scale_factor: float = 1.0
    max_images: int = 2
    max_words: int = 32
    temperature: float = 0.0

    def generate_kwargs(self) -> dict:
        return {"num_words": max(int(self.max_words), 1), "ret_scale_factor": float(self.ret_scale_factor),
                "top_p": TOP_P_WHEN_SAMPLING if self.temperature > 0 else 1.0,
                "temperature": float(self.temperature), "max_num_rets": int(self.max_images)}


# -- conversation logic (no Gradio) --------------------------------------------------------------------------

def load_upload(path: str | Path) -> Image.Image:
    """An uploaded file as the original demo hands it to the model: `resize((224, 224)).convert('RGB')`.
    Files over `MAX_UPLOAD_BYTES` or `MAX_UPLOAD_PIXELS`, and undecodable ones, are a DemoInputError."""
    from model.errors import FromageInputError
    from model.images import SQUASH, open_image, prepare

    size = os.path.getsize(path)
    if size > MAX_UPLOAD_BYTES:
        raise DemoInputError(f"the image file is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MB")
    try:
        with Image.open(path) as img:  # reads the header only: the size is known before decoding
            width, height = img.size
    except Exception as err:  # noqa: BLE001 - whatever Pillow raises, the user gets one message
        raise DemoInputError(f"not a readable image: {err}") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise DemoInputError(f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
                             f"the limit is {MAX_UPLOAD_PIXELS / 1e6:.0f} megapixels")
    try:
        return prepare(open_image(path), SQUASH)
    except FromageInputError as err:
        raise DemoInputError(f"not a readable image: {err.problem}") from None


def add_upload(conversation: Conversation, image: Image.Image) -> Conversation:
    return Conversation(conversation.entries + (Entry(image=image),), conversation.history + (image, ""))


def check_message(text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise DemoInputError(f"the message has {len(text)} characters; the limit is {MAX_TEXT_CHARS}")


def model_prompt(conversation: Conversation, text: str) -> list[Part]:
    """The whole conversation so far plus the question, as the original sends it."""
    from model.prompts import question_turn

    return [*conversation.history, question_turn(text)]


def shown_parts(outputs: list) -> tuple[Part, ...]:
    """The model's outputs as shown: text with `[RET]` removed (empty text dropped), retrieved images inline."""
    parts: list[Part] = []
    for output in outputs:
        if isinstance(output, str):
            text = output.replace("[RET]", "").strip()
            if text:
                parts.append(text)
        elif isinstance(output, Image.Image):
            parts.append(output)
        else:  # the images retrieved for one [RET]
            parts.extend(output)
    return tuple(parts)


def ask(conversation: Conversation, text: str, generate: Callable[..., list], controls: Controls) -> Conversation:
    """One turn: `generate(prompt, **decoding)` (the model's `generate_for_images_and_texts`) on the whole
    conversation plus the question. An empty message is ignored, as in the original."""
    from model.prompts import answer_turn

    if not text:
        return conversation
    check_message(text)
    prompt = model_prompt(conversation, text)
    log.info("generating for %d prompt items with %s", len(prompt), controls)
    outputs = generate(prompt, **controls.generate_kwargs())
    entry = Entry(question=text, answer=shown_parts(outputs))
    return Conversation(conversation.entries + (entry,), tuple(prompt) + (answer_turn(outputs),))


def undo(conversation: Conversation) -> Conversation:
    """Drop the last shown entry and the two history items it added."""
    return replace(conversation, entries=conversation.entries[:-1], history=conversation.history[:-2])


def reset() -> Conversation:
    return Conversation()


# -- output: chat messages and the saved HTML ----------------------------------------------------------------

def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_file(image: Image.Image, directory: Path) -> str:
    """The image as a PNG in `directory`, named by its content (written once, however often it is shown)."""
    data = png_bytes(image)
    path = directory / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.exists():
        path.write_bytes(data)
    return str(path)


def chat_messages(conversation: Conversation, files: Path) -> list[dict]:
    """Gradio Chatbot messages: an upload is a user image; a question is user text and one assistant message
    holding the answer's text and images in order. Text is HTML-escaped: the Chatbot renders Markdown with
    HTML, and what the user and the model wrote is shown as written."""
    def content(part: Part):
        if isinstance(part, str):
            return html.escape(part)
        return {"path": image_file(part, files), "mime_type": "image/png"}

    messages = []
    for entry in conversation.entries:
        if entry.image is not None:
            messages.append({"role": "user", "content": [content(entry.image)]})
        else:
            messages.append({"role": "user", "content": content(entry.question)})
            messages.append({"role": "assistant", "content": [content(p) for p in entry.answer] or ""})
    return messages


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 50em; margin: 2em auto; padding: 0 1em; color: #222; }
.msg { margin: 0.6em 0; padding: 0.6em 0.9em; border-radius: 0.6em; white-space: pre-wrap; }
.user { background: #e8eefc; margin-left: 20%; }
.bot { background: #f1f1f1; margin-right: 20%; }
.who { font-weight: 600; font-size: 0.8em; color: #555; display: block; }
img { width: 224px; height: 224px; margin: 0.3em 0.3em 0 0; vertical-align: top; }
</style>
</head>
<body>
<h1>{{ title }}</h1>
{% for entry in entries %}
{% if entry.image %}
<div class="msg user"><span class="who">You</span><img src="{{ entry.image }}" alt="uploaded image"></div>
{% else %}
<div class="msg user"><span class="who">You</span>{{ entry.question }}</div>
<div class="msg bot"><span class="who">FROMAGe</span>
{%- for part in entry.answer %}{% if part.image %}<img src="{{ part.image }}" alt="retrieved image">
{%- else %}{{ part.text }} {% endif %}{% endfor %}</div>
{% endif %}
{% endfor %}
</body>
</html>
"""


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def conversation_html(conversation: Conversation, title: str = "FROMAGe conversation") -> str:
    """The conversation as one self-contained HTML page: images as data URIs, every text escaped (Jinja2
    autoescape), no script, and a CSP that allows nothing but inline style and data: images."""
    from jinja2 import Environment

    def part(p: Part) -> dict:
        return {"text": p} if isinstance(p, str) else {"image": data_uri(p)}

    entries = [{"image": data_uri(e.image)} if e.image is not None else
               {"question": e.question, "answer": [part(p) for p in e.answer]} for e in conversation.entries]
    return Environment(autoescape=True).from_string(HTML_TEMPLATE).render(title=title, entries=entries)


def save_html(conversation: Conversation, directory: Path) -> Path:
    """Write `conversation_html` to a new file in `directory` (one per save, so earlier downloads stay valid)."""
    handle, name = tempfile.mkstemp(prefix="fromage-conversation-", suffix=".html", dir=directory)
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(conversation_html(conversation))
    return Path(name)


# -- the Gradio layer ----------------------------------------------------------------------------------------

INTRO = """# FROMAGe
Upload an image and/or type a message: FROMAGe answers with text and, where it produces `[RET]`, images retrieved
from its retrieval set. The whole conversation is sent each turn, as in the original demo. Uploads are squashed to
224x224 (up to {mb} MB and {mpx} megapixels); messages up to {chars} characters."""


def _gradio():
    from model.errors import FromageInputError

    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry and no version check, before the import
    try:
        import gradio
    except ImportError:
        raise FromageInputError("gradio", "not installed",
                                "the demo needs the demo extra: pip install -e .[demo]") from None
    return gradio


def theme():
    gr = _gradio()
    return gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def build_demo(fromage, files: Path, controls: Controls = Controls()):
    """The chat UI over the functions above; `files` holds the PNGs shown and the saved HTML files; `controls`
    are the sliders' initial values."""
    gr = _gradio()

    def user_error(err: DemoInputError):
        return gr.Error(str(err), title="Not accepted")

    def on_upload(path, conversation):
        try:
            conversation = add_upload(conversation, load_upload(path))
        except DemoInputError as err:
            raise user_error(err) from None
        return conversation, chat_messages(conversation, files)

    def on_ask(text, conversation, ret_scale_factor, max_images, max_words, temperature):
        controls = Controls(ret_scale_factor, int(max_images), int(max_words), temperature)
        try:
            conversation = ask(conversation, text, fromage.generate_for_images_and_texts, controls)
        except DemoInputError as err:
            raise user_error(err) from None
        except Exception as err:  # e.g. a conversation longer than the LM's context: say so, keep the chat
            log.exception("generation failed")
            raise gr.Error(f"the model failed ({type(err).__name__}: {err}); Undo or Reset shortens the "
                           "conversation", title="Generation failed") from None
        return conversation, chat_messages(conversation, files), ""

    def on_undo(conversation):
        conversation = undo(conversation)
        return conversation, chat_messages(conversation, files)

    def on_reset():
        return reset(), []

    def on_save(conversation):
        return gr.File(value=str(save_html(conversation, files)), visible=True)

    # delete_cache: Gradio's copies of shown images and saved pages, hourly once a day old, and at shutdown
    with gr.Blocks(title="FROMAGe demo", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(INTRO.format(mb=MAX_UPLOAD_BYTES // 2**20, mpx=MAX_UPLOAD_PIXELS // 10**6, chars=MAX_TEXT_CHARS))
        state = gr.State(Conversation())
        with gr.Row():
            with gr.Column(scale=7, min_width=500):
                chatbot = gr.Chatbot(elem_id="chatbot", label="FROMAGe", height=520, feedback_options=None,
                                     buttons=["copy_all"], allow_tags=False)
                with gr.Row():
                    upload = gr.UploadButton("Upload image", file_types=["image"], elem_id="upload", scale=1)
                    text = gr.Textbox(label="Message", placeholder="Type a message", elem_id="message", scale=4)
                    submit = gr.Button("Submit", variant="primary", elem_id="submit", scale=1)
                with gr.Row():
                    undo_button = gr.Button("Undo", elem_id="undo")
                    reset_button = gr.Button("Reset all", elem_id="reset")
                    save_button = gr.Button("Save conversation as HTML", elem_id="save")
                saved = gr.File(label="Saved conversation", visible=False, elem_id="saved", interactive=False)
                gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[text],
                            label="Example prompts from the original example notebook")
            with gr.Column(scale=3, min_width=300):
                ret_scale_factor = gr.Slider(0.0, 3.0, value=controls.ret_scale_factor, step=0.1, label="Frequency multiplier for returning "
                                             "images (ret_scale_factor; higher means more frequent)")
                max_images = gr.Slider(0, 3, value=2, step=1, label="Max images to return")
                max_words = gr.Slider(1, 64, value=32, step=1, label="Max # of words")
                temperature = gr.Slider(0.0, 1.0, value=0.0, step=0.05,
                                        label="Temperature (0 for deterministic; top_p 0.95 above 0)")

        gr.on([text.submit, submit.click], on_ask,
              [text, state, ret_scale_factor, max_images, max_words, temperature], [state, chatbot, text],
              api_name="ask", concurrency_limit=1, concurrency_id="model")  # one model: one request at a time
        upload.upload(on_upload, [upload, state], [state, chatbot], api_name="upload")
        undo_button.click(on_undo, [state], [state, chatbot], api_name="undo")
        reset_button.click(on_reset, None, [state, chatbot], api_name="reset")
        chatbot.clear(on_reset, None, [state, chatbot], api_visibility="private")  # its bin icon: Reset too
        save_button.click(on_save, [state], [saved], api_name="save")
    demo.queue(default_concurrency_limit=1, max_size=16)
    return demo


def check_port_free(host: str, port: int) -> None:
    """Bad input, before the model loads, if `host:port` cannot be bound (taken, or not an address here)."""
    from model.errors import FromageInputError

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        # create_server appends the address to the reason; the message names it already
        reason = (err.strerror or str(err)).split(" (while attempting to bind")[0]
        raise FromageInputError(f"--host {host} --port {port}", f"cannot listen there: {reason}",
                                "choose another --port or --host") from None


def launch(demo, host: str, port: int, files: Path, block: bool = True):
    """Serve `demo` at host:port, not shared, nothing fetched from the Internet."""
    return demo.launch(server_name=host, server_port=port, share=False, allowed_paths=[str(files)],
                       max_file_size=MAX_UPLOAD_BYTES, theme=theme(), ssr_mode=False, pwa=False, mcp_server=False,
                       enable_monitoring=False, footer_links=["api"], prevent_thread_lock=not block, quiet=True)


def cmd_demo(args) -> int:
    from .cli import _load, use_embedded_default

    _gradio()  # missing, or the port taken: said before the model loads
    check_port_free(args.host, args.port)
    embedded = use_embedded_default(args)
    if args.ret_scale_factor is None:
        args.ret_scale_factor = EMBEDDED_RET_SCALE_FACTOR if embedded else Controls.ret_scale_factor
    fromage = _load(args)
    if fromage.retrieval_set is None:
        log.warning("no retrieval set: a [RET] answer will fail (give --retrieval-set DIR)")
    with tempfile.TemporaryDirectory(prefix="fromage-demo-") as files:
        demo = build_demo(fromage, Path(files), Controls(ret_scale_factor=args.ret_scale_factor))
        print(f"FROMAGe demo at http://{args.host}:{args.port}/ (Ctrl-C stops it)", flush=True)
        launch(demo, args.host, args.port, Path(files))
    return 0


def add_demo_parser(subparsers) -> None:
    from .cli import _add_model_arguments

    p = subparsers.add_parser("demo", help="the interactive Gradio chat of the original FROMAGe demo "
                                           "(needs the demo extra: pip install -e .[demo])")
    _add_model_arguments(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine "
                                                        "only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--ret-scale-factor", type=float, help="the ret_scale_factor slider's initial value (default 1.0, "
                   f"as the original; {EMBEDDED_RET_SCALE_FACTOR} when serving the embedded default)")
    p.set_defaults(func=cmd_demo)
