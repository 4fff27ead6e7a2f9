"""`fromage-bench demo`: the conversation logic against the original demo's behaviour (written out by hand),
then a real server (a `fromage-bench demo` subprocess on a tiny model that retrieves) through gradio_client
and a headless browser."""
from __future__ import annotations

import base64
import importlib.util
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fromage_bench import demo
from fromage_bench.cli import main
from model import RetrievalSet, load_fromage, make_tiny, read_model_args
from model.checkpoint import save_release
from model.images import CROP, open_image, prepare
from model.prompts import embed_prompt
from tests.browser import browser  # noqa: F401 (a fixture)
from tests.browser import assert_not_blank, clear_logs, page_problems, require, settle
from tests.reference.photos import awkward_image_files, photo_like
from tests.test_training import REPO, free_port

QUESTION = "What is this image?"


# -- a tiny model that produces [RET], and a retrieval set over awkward files ---------------------------------

def make_retrieving_tiny(directory: Path, image: Image.Image) -> Path:
    """A tiny model whose greedy answers start with [RET]: its [RET] row (input embedding, tied to the LM head
    in OPT) points along the mean final hidden state of demo-like prompts, with a norm that outscores every
    other token."""
    out = make_tiny(directory, seed=0)
    fromage = load_fromage(out, device="cpu", precision="fp32")
    model = fromage.model
    prompts = [[image, "", f"Q: {QUESTION}\nA:"], ["Q: Is the image in color?\nA:"],
               [image, "", f"Q: {QUESTION}\nA:", " [RET]\n", "Q: Show me more\nA:"]]
    with torch.no_grad():
        hidden = torch.cat([model.lm(inputs_embeds=embed_prompt(model, p).embeds[None], output_hidden_states=True)
                            .hidden_states[-1][0] for p in prompts])
        model.input_embeddings.weight[model.retrieval_token_idx] = 3.0 * F.normalize(hidden.mean(0), dim=0)
    save_release(model, out, read_model_args(out))
    return out


@pytest.fixture(scope="module")
def upload_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("upload") / "photo 3x2.jpg"  # a space in the name, non-square
    photo_like(11, (300, 200)).save(path, quality=90)
    return path


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, upload_file) -> tuple[Path, Path]:
    """(model dir, retrieval set dir): the retrieval set built as ISSUE 15 says the builder does (Image.open,
    the processor's crop, get_visual_embs(mode="retrieval")) over non-square files in odd modes."""
    root = tmp_path_factory.mktemp("demo")
    model_dir = make_retrieving_tiny(root / "model", demo.load_upload(upload_file))
    files = awkward_image_files(root / "images")
    fromage = load_fromage(model_dir, device="cpu", precision="fp32")
    names = sorted(files)
    images = [prepare(open_image(files[name]), CROP) for name in names]
    retrieval = RetrievalSet(names, fromage.encode_images(images, mode="retrieval"), image_root=str(root / "images"))
    return model_dir, retrieval.save(root / "retrieval")


# -- the conversation logic, against the original demo written out by hand -----------------------------------

class ScriptedModel:
    """Stands in for `generate_for_images_and_texts`: records each call, answers from a script."""

    def __init__(self, *answers):
        self.answers, self.calls = list(answers), []

    def __call__(self, prompt, **kwargs):
        self.calls.append((list(prompt), kwargs))
        return self.answers.pop(0)


def pixels(image: Image.Image) -> tuple:
    return image.mode, image.size, image.tobytes()


def test_two_turns_with_an_image_send_what_the_original_sends(upload_file):
    retrieved = [photo_like(20, (224, 224)), photo_like(21, (224, 224))]
    model = ScriptedModel(["A bird on a branch. [RET]", [retrieved[0]], "a nest [RET]", [retrieved[1]]],
                          ["Yes, it is."])
    image = demo.load_upload(upload_file)
    conversation = demo.add_upload(demo.Conversation(), image)
    conversation = demo.ask(conversation, "What is this image?", model, demo.Controls())
    conversation = demo.ask(conversation, "Is the image in color?", model, demo.Controls())

    # the original: chat_history = [image, ""] after the upload; each turn sends chat_history + ['Q: ' + text +
    # '\nA:'] and appends ' '.join(the output strings) + '\n'
    first = [image, "", "Q: What is this image?\nA:"]
    second = first + ["A bird on a branch. [RET] a nest [RET]\n", "Q: Is the image in color?\nA:"]
    assert [prompt for prompt, _ in model.calls] == [first, second]
    assert list(conversation.history) == second + ["Yes, it is.\n"]
    assert model.calls[0][1] == {"num_words": 32, "ret_scale_factor": 1.0, "top_p": 1.0, "temperature": 0.0,
                                 "max_num_rets": 2}
    # shown: the upload, then each answer's text without [RET] and its retrieved images in order
    assert [e.image for e in conversation.entries] == [image, None, None]
    assert [e.question for e in conversation.entries] == [None, "What is this image?", "Is the image in color?"]
    assert conversation.entries[1].answer == ("A bird on a branch.", retrieved[0], "a nest", retrieved[1])
    assert conversation.entries[2].answer == ("Yes, it is.",)


def test_undo_removes_the_last_turn_and_reset_everything(upload_file):
    model = ScriptedModel(["A bird."], ["Yes."])
    image = demo.load_upload(upload_file)
    after_upload = demo.add_upload(demo.Conversation(), image)
    one = demo.ask(after_upload, "What is this image?", model, demo.Controls())
    two = demo.ask(one, "Is it?", model, demo.Controls())
    assert demo.undo(two) == one                 # the original: conversation[:-1], chat_history[:-2]
    assert demo.undo(one) == after_upload
    assert demo.undo(after_upload) == demo.Conversation() == demo.undo(demo.Conversation())
    assert demo.reset() == demo.Conversation()


def test_decoding_rules_and_ignored_empty_message():
    assert demo.Controls(temperature=0.0).generate_kwargs()["top_p"] == 1.0
    sampling = demo.Controls(ret_scale_factor=1.3, max_images=3, max_words=0, temperature=0.7).generate_kwargs()
    assert sampling == {"num_words": 1, "ret_scale_factor": 1.3, "top_p": 0.95, "temperature": 0.7, "max_num_rets": 3}
    model = ScriptedModel()
    assert demo.ask(demo.Conversation(), "", model, demo.Controls()) == demo.Conversation()
    assert model.calls == []


def test_uploads_are_squashed_as_the_original_does(awkward_files):
    for name, path in awkward_files.items():  # non-square; L, P, RGBA, CMYK: resize happens before convert
        with Image.open(path) as original:
            expected = original.resize((224, 224)).convert("RGB")
        assert pixels(demo.load_upload(path)) == pixels(expected), name


def test_bounds_on_uploads_and_messages(tmp_path, upload_file, monkeypatch):
    big = tmp_path / "big.png"
    photo_like(3, (500, 400)).save(big)
    monkeypatch.setattr(demo, "MAX_UPLOAD_PIXELS", 500 * 400 - 1)
    with pytest.raises(demo.DemoInputError, match=r"500x400 = 0.2 megapixels; the limit is 0 megapixels"):
        demo.load_upload(big)
    monkeypatch.setattr(demo, "MAX_UPLOAD_BYTES", os.path.getsize(upload_file) - 1)
    with pytest.raises(demo.DemoInputError, match="MB; the limit is 0 MB"):
        demo.load_upload(upload_file)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    with pytest.raises(demo.DemoInputError, match="not a readable image"):
        demo.load_upload(not_image)
    model = ScriptedModel()
    demo.ask(demo.Conversation(), "x" * demo.MAX_TEXT_CHARS, ScriptedModel(["ok"]), demo.Controls())
    with pytest.raises(demo.DemoInputError, match=f"{demo.MAX_TEXT_CHARS + 1} characters; the limit is"):
        demo.ask(demo.Conversation(), "x" * (demo.MAX_TEXT_CHARS + 1), model, demo.Controls())
    assert model.calls == []


def test_saved_html_is_self_contained_and_escaped(upload_file):
    image = demo.load_upload(upload_file)
    retrieved = photo_like(5, (224, 224))
    conversation = demo.add_upload(demo.Conversation(), image)
    model = ScriptedModel(["<b>hi</b> [RET]", [retrieved]])
    conversation = demo.ask(conversation, "<script>alert(1)</script> & co?", model, demo.Controls())
    page = demo.conversation_html(conversation)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co?" in page
    assert "&lt;b&gt;hi&lt;/b&gt;" in page and "[RET]" not in page
    uris = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    decoded = [Image.open(io.BytesIO(base64.b64decode(u))) for u in uris]
    assert [pixels(d.convert("RGB")) for d in decoded] == [pixels(image), pixels(retrieved)]
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing to fetch


# -- the command line: bad input ------------------------------------------------------------------------------

def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_dir, capsys, monkeypatch):
    port = free_port()
    assert main(["demo", "--model-dir", str(tmp_path / "missing"), "--port", str(port)]) == 2
    assert main(["demo", "--model-dir", str(tiny_dir), "--retrieval-set", str(tmp_path), "--port", str(port)]) == 2
    with socket.create_server(("127.0.0.1", 0)) as taken:
        taken_port = taken.getsockname()[1]
        assert main(["demo", "--model-dir", str(tiny_dir), "--port", str(taken_port)]) == 2
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` fails, as without the demo extra
    assert main(["demo", "--model-dir", str(tiny_dir), "--port", str(port)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("fromage-bench: error: ") for line in lines), lines
    assert f"{tmp_path / 'missing' / 'model_args.json'}: missing" in lines[0]
    assert f"{tmp_path / 'retrieval_embeddings.safetensors'}: missing" in lines[1]
    assert lines[2].endswith(f"--port {taken_port}: cannot listen there: Address already in use "
                             "(choose another --port or --host)"), lines[2]
    assert lines[3] == ("fromage-bench: error: gradio: not installed (the demo needs the demo extra: "
                        "pip install -e .[demo])")


# -- a real server -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    """`fromage-bench demo` in a subprocess, default host; its URL once it answers."""
    for package in ("gradio", "gradio_client"):
        require(package, importlib.util.find_spec(package), "pip install -e .[demo]")
    model_dir, retrieval = served_model
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "fromage_bench", "demo", "--model-dir", str(model_dir),
                                 "--retrieval-set", str(retrieval), "--port", str(port), "--device", "cpu",
                                 "--precision", "fp32"], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the demo exited with {proc.returncode}: {log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the demo did not answer in 120 s: {log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield {"url": url, "port": port, "pid": proc.pid}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def listening_addresses(port: int) -> list[str]:
    """Addresses of the sockets listening on `port`, from the kernel's tables (/proc/net/tcp and tcp6)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in list(rows)[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per-word little-endian
                    found.append(socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words))
    return found


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's socket tables")
def test_server_binds_localhost_by_default(server):
    assert listening_addresses(server["port"]) == ["127.0.0.1"]


def test_api_upload_and_question_give_an_answer_with_retrieved_images(server, upload_file, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server["url"], verbose=False, download_files=str(tmp_path), analytics_enabled=False)
    shown = client.predict(handle_file(str(upload_file)), api_name="/upload")
    assert [m["role"] for m in shown] == ["user"]
    with Image.open(shown[0]["content"][0]["file"]) as img:  # the squashed upload, as the model sees it
        assert pixels(img.convert("RGB")) == pixels(demo.load_upload(upload_file))
    shown, text_box = client.predict(QUESTION, 1.0, 2, 32, 0.0, api_name="/ask")
    assert text_box == "" and [m["role"] for m in shown] == ["user", "user", "assistant"]
    assert shown[1]["content"] == [{"text": QUESTION, "type": "text"}]
    answer = shown[2]["content"]
    images = [part["file"] for part in answer if part["type"] == "file"]
    assert len(images) == 2  # "max images to return" 2: the fixture model says [RET] at once, every time
    assert all("[RET]" not in part.get("text", "") for part in answer)
    for path in images:
        with Image.open(path) as img:
            assert img.size == (224, 224)
    with pytest.raises(Exception, match=f"{demo.MAX_TEXT_CHARS + 1} characters; the limit is {demo.MAX_TEXT_CHARS}"):
        client.predict("x" * (demo.MAX_TEXT_CHARS + 1), 1.0, 2, 32, 0.0, api_name="/ask")  # the user sees why
    shown = client.predict(api_name="/undo")
    assert [m["role"] for m in shown] == ["user"]


CHAT_JS = """const chat = document.querySelector('#chatbot'); const all = s => Array.from(chat.querySelectorAll(s));
return {user_images: all('.user img').length, bot_messages: all('.bot').length, bot_images: all('.bot img').length,
  broken: all('img').filter(i => !i.complete || i.naturalWidth === 0).length,
  user_text: all('.user').map(e => e.innerText).join('\\n'), bot_text: all('.bot').map(e => e.innerText).join('\\n')}"""
PAGE_JS = """return {images: document.images.length, scripts: document.scripts.length, text: document.body.innerText,
  broken: Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length}"""


def wait_for(driver, condition, what: str, timeout: float = 60):
    """Poll `condition()` until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}; chat: {driver.execute_script(CHAT_JS)}")
        time.sleep(0.2)
    return value


def test_browser_chat_retrieves_undoes_and_saves(server, browser, upload_file, tmp_path):
    from selenium.webdriver.common.by import By

    origin = server["url"].rstrip("/")
    same_origin = lambda url: url.startswith((origin + "/", "data:", "blob:"))  # noqa: E731 - nothing else fetched
    chat = lambda: browser.execute_script(CHAT_JS)  # noqa: E731
    browser.get("about:blank")
    clear_logs(browser)  # the new-tab page's own requests
    browser.get(server["url"])
    wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#upload"), "the page")
    browser.find_element(By.CSS_SELECTOR, "input[type=file][accept='image/*']").send_keys(str(upload_file))
    wait_for(browser, lambda: chat()["user_images"] == 1, "the uploaded image in the chat")

    question = "What is <b>this</b> image?"  # shown as written, not as HTML
    browser.find_element(By.CSS_SELECTOR, "#message textarea").send_keys(question)
    browser.find_element(By.CSS_SELECTOR, "#submit").click()
    shown = wait_for(browser, lambda: (c := chat())["bot_images"] == 2 and c["broken"] == 0 and c, "the answer")
    assert question in shown["user_text"] and "[RET]" not in shown["bot_text"], shown
    assert browser.find_element(By.CSS_SELECTOR, "#message textarea").get_attribute("value") == ""
    settle(0.5)
    assert_not_blank(browser)

    browser.find_element(By.CSS_SELECTOR, "#save").click()
    link = wait_for(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#saved a[download]"), "the saved file")
    saved = tmp_path / "conversation.html"
    with urllib.request.urlopen(link[0].get_attribute("href"), timeout=10) as response:
        saved.write_bytes(response.read())

    browser.find_element(By.CSS_SELECTOR, "#undo").click()
    after = wait_for(browser, lambda: (c := chat())["bot_messages"] == 0 and c, "Undo")
    assert after["user_images"] == 1 and question not in after["user_text"], after  # the upload stays
    assert page_problems(browser, allowed=same_origin) == []

    clear_logs(browser)
    browser.get(saved.as_uri())
    settle()
    page = browser.execute_script(PAGE_JS)
    assert page["images"] == 3 and page["broken"] == 0, page  # the upload and the two retrieved images
    assert page["scripts"] == 0 and question in page["text"], page
    assert page_problems(browser, allowed=lambda url: url.startswith("data:") or url == saved.as_uri()) == []


class SlowModel:
    """Stands in for the model: notes how many calls overlap."""

    def __init__(self):
        self.running = self.most_at_once = self.calls = 0
        self.lock = threading.Lock()

    def generate_for_images_and_texts(self, prompt, **kwargs):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most_at_once = max(self.most_at_once, self.running)
        time.sleep(0.5)
        with self.lock:
            self.running -= 1
        if "too long" in prompt[-1]:
            raise IndexError("index out of range in self")  # what OPT's position embedding says
        return ["ok."]


def test_requests_from_several_users_run_one_at_a_time_and_nothing_leaves_the_machine(tmp_path, monkeypatch):
    require("gradio_client", importlib.util.find_spec("gradio_client"), "pip install -e .[demo]")
    from gradio_client import Client

    elsewhere, resolve, clients_starting = [], socket.getaddrinfo, threading.Event()

    def local_only(host, *args, **kwargs):  # analytics, a version check, fonts, share tunnels would resolve a name
        if host not in ("127.0.0.1", "localhost", "::1"):
            if not clients_starting.is_set():  # gradio_client's own look-up (huggingface_hub headers) is not ours
                elsewhere.append(host)
            raise OSError(f"{host}: the demo must not reach the network")
        return resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    model = SlowModel()
    app = demo.build_demo(model, tmp_path)
    port = free_port()
    demo.launch(app, "127.0.0.1", port, tmp_path, block=False)
    try:
        clients_starting.set()
        clients = [Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False) for _ in range(3)]
        clients_starting.clear()
        jobs = [c.submit(f"question {i}", 1.0, 2, 32, 0.0, api_name="/ask") for i, c in enumerate(clients)]
        answers = [job.result(timeout=60) for job in jobs]
        with pytest.raises(Exception, match=r"the model failed \(IndexError: index out of range in self\); Undo"):
            clients[0].predict("too long", 1.0, 2, 32, 0.0, api_name="/ask")
        shown, _ = clients[0].predict("again", 1.0, 2, 32, 0.0, api_name="/ask")
        texts = [[part["text"] for part in m["content"]] for m in shown]
        assert texts == [["question 0"], ["ok."], ["again"], ["ok."]]  # the failed turn left no trace
    finally:
        app.close()
    assert [a[0][-1]["content"] for a in answers] == [[{"text": "ok.", "type": "text"}]] * 3
    assert model.calls == 5 and model.most_at_once == 1
    assert elsewhere == []


def test_no_model_flags_serve_the_embedded_default_on_localhost(served_model, monkeypatch):
    """`fromage-bench demo` alone: the embedded default's model and retrieval set (ensure_model, stubbed here:
    building it takes minutes), served at 127.0.0.1."""
    import fromage_bench.embedded

    model_dir, retrieval = served_model
    served = {}
    monkeypatch.setattr(fromage_bench.embedded, "ensure_model", lambda work: (model_dir, retrieval), raising=False)
    monkeypatch.setattr(demo, "build_demo", lambda fromage, files, controls: served.update(fromage=fromage,
                                                                                           controls=controls))
    monkeypatch.setattr(demo, "launch", lambda app, host, port, files: served.update(host=host, port=port))
    monkeypatch.setattr(demo, "check_port_free", lambda host, port: None)  # 7860 may be taken on this machine
    assert main(["demo", "--device", "cpu"]) == 0
    assert served["host"] == "127.0.0.1" and served["port"] == demo.DEFAULT_PORT
    assert served["fromage"].retrieval_set.paths == RetrievalSet.load(retrieval).paths
    assert served["controls"].ret_scale_factor == demo.EMBEDDED_RET_SCALE_FACTOR  # its small LM needs the nudge
    assert main(["demo", "--device", "cpu", "--ret-scale-factor", "1.2"]) == 0
    assert served["controls"].ret_scale_factor == 1.2
