"""The playground in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``, driven by
selenium; harness/browser.py) against the real server. Skipped, saying why, where there is no Chromium;
.ci/run installs it so these run in CI."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from harness import browser as chromium_browser
from harness.data import held_out_digits, png_bytes, served_vocab
from loadtest.faults import store_copy

pytestmark = pytest.mark.skipif(chromium_browser.missing_reason() is not None,
                                reason=f"no headless Chromium: {chromium_browser.missing_reason()}")
WAIT_S = 60.0  # a shared CI box can be slow; every wait polls and stops as soon as its condition holds
PUBLIC = re.compile(r"^/(playground(/.*)?|models|classify|features|generate|metrics)$")


@pytest.fixture(scope="module")
def driver():
    chrome = chromium_browser.chromium()
    yield chrome
    chrome.quit()


def wait_for(condition, what: str, timeout: float = WAIT_S):
    """Poll ``condition()`` until it is truthy (returned), failing with ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # an element not there yet
            last_error = e
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last error: {last_error!r})")


def open_page(driver, url: str) -> None:
    driver.get(url + "/playground")
    driver.execute_script("performance.setResourceTimingBufferSize(100000)")
    wait_for(lambda: text(driver, "server-status").startswith(tuple("0123456789")), "GET /models")


def text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def set_value(driver, element_id: str, value: str) -> None:
    """Set a form field as a user's typing would end: the value, then its change event."""
    js(driver, "const e = document.getElementById(arguments[0]); e.value = arguments[1];"
               "e.dispatchEvent(new Event('change'));", element_id, value)


def upload(driver, path: Path) -> None:
    driver.find_element("id", "file").send_keys(str(path))
    wait_for(lambda: path.name in text(driver, "preview-caption"), f"the preview of {path.name}")


def requested_paths(driver) -> list[str]:
    return js(driver, "return performance.getEntriesByType('resource').map(e => new URL(e.name).pathname)")


def assert_public_api_only(driver) -> None:
    """Every request the page made went to its own files or the public inference endpoints, and its script
    threw nothing (an uncaught error is a SEVERE "javascript" entry of the console)."""
    paths = requested_paths(driver)
    assert paths and all(PUBLIC.match(p) for p in paths), sorted(set(paths))
    errors = [e["message"] for e in driver.get_log("browser") if e["source"] == "javascript" and e["level"] == "SEVERE"]
    assert not errors, errors


def top_prediction(driver) -> tuple[str, str]:
    first = driver.find_element("css selector", "#classify-bars li")
    return first.find_element("class name", "label").text, first.find_element("class name", "value").text


def correct_held_out_digit(url: str, tmp_path: Path) -> tuple[Path, str, float]:
    """A held-out digit the served lenet5 classifies right (the tiny test model is not always right): its PNG
    file, label and top probability, asked over the API."""
    images, labels = held_out_digits()
    for image, label in zip(images[:50], labels[:50], strict=True):
        png = png_bytes(image)
        answer = requests.post(url + "/classify", files={"image": png}, data={"model": "lenet5"}, timeout=30).json()
        if answer["predictions"][0]["label"] == str(label):
            path = tmp_path / f"held-out-{label}.png"
            path.write_bytes(png)
            return path, str(label), answer["predictions"][0]["probability"]
    raise AssertionError("the served lenet5 got none of 50 held-out digits right")


def test_uploaded_held_out_digit_gets_its_label(driver, live_server, tmp_path):
    path, label, probability = correct_held_out_digit(live_server.http_url, tmp_path)
    open_page(driver, live_server.http_url)
    set_value(driver, "classify-model", "lenet5")
    upload(driver, path)
    wait_for(lambda: top_prediction(driver)[0] == label and "answered by lenet5:" in text(driver, "classify-meta"),
             f"label {label} on top")
    assert top_prediction(driver)[1] == f"{100 * probability:.1f}%"
    meta = text(driver, "classify-meta")
    assert re.search(r"in a batch of \d+ · server: .*inference [\d.]+ ms.*round trip [\d.]+ ms", meta), meta
    bars = driver.find_elements("css selector", "#classify-bars li")
    assert len(bars) == 5
    assert_public_api_only(driver)


def test_drawn_digit_is_sent_in_mnist_layout(driver, live_server):
    from selenium.webdriver import ActionChains

    open_page(driver, live_server.http_url)
    canvas = driver.find_element("id", "canvas")
    # A "7": a stroke across the top, then down to the left.
    ActionChains(driver).move_to_element_with_offset(canvas, -50, -60).click_and_hold() \
        .move_by_offset(50, 0).move_by_offset(50, 0).move_by_offset(-30, 60).move_by_offset(-30, 60) \
        .release().perform()
    wait_for(lambda: "your drawing" in text(driver, "preview-caption"), "the drawing as the image")
    wait_for(lambda: js(driver, "return document.getElementById('preview').naturalWidth") == 28, "a 28x28 image")
    wait_for(lambda: len(driver.find_elements("css selector", "#classify-bars li")) == 5, "5 classes")
    # The image sent is white ink centred on black, as MNIST's digits.
    pixels = js(driver, """
        const img = document.getElementById('preview');
        const c = document.createElement('canvas'); c.width = 28; c.height = 28;
        const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
        return Array.from(ctx.getImageData(0, 0, 28, 28).data.filter((_, i) => i % 4 === 0));""")
    digit = np.array(pixels).reshape(28, 28)
    assert digit[:4].max() == 0 and digit[-4:].max() == 0 and digit.max() > 200  # a 20x20 box in the middle
    assert not driver.find_element("id", "classify-error").is_displayed()


def test_dropped_file_is_used(driver, live_server):
    open_page(driver, live_server.http_url)
    wait_for(lambda: len(driver.find_elements("css selector", "#neighbours li")) == 8, "the first gallery digit's")
    js(driver, "document.getElementById('neighbours').replaceChildren()")  # the wait below sees the drop's answer
    # What a drop from a file manager delivers: a drop event whose DataTransfer holds the file.
    driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch('/playground/gallery/100.png').then((r) => r.blob()).then((blob) => {
          const transfer = new DataTransfer();
          transfer.items.add(new File([blob], 'dropped.png', {type: 'image/png'}));
          document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer}));
          done();
        });""")
    wait_for(lambda: "dropped.png" in text(driver, "preview-caption"), "the dropped file as the image")
    # Gallery digit 100 (a 8) dropped: the features panel finds it first among the gallery, at 1.000.
    wait_for(lambda: len(driver.find_elements("css selector", "#neighbours li")) == 8, "the dropped digit's")
    first = driver.find_element("css selector", "#neighbours li")
    assert first.find_element("class name", "label").text == "8"
    assert first.find_element("class name", "value").text == "1.000"


def test_features_neighbours_by_cosine(driver, live_server, tmp_path):
    models = requests.get(live_server.http_url + "/models", timeout=30).json()["models"]
    dim = next(m["feature_dim"] for m in models if m["name"] == "vgg_fc7")
    gallery = requests.get(live_server.http_url + "/playground/gallery.json", timeout=30).json()["digits"]
    digit = gallery[37]
    path = tmp_path / "gallery-37.png"
    path.write_bytes(requests.get(live_server.http_url + digit["url"], timeout=30).content)
    open_page(driver, live_server.http_url)
    upload(driver, path)
    wait_for(lambda: len(driver.find_elements("css selector", "#neighbours li")) == 8, "8 neighbours")
    assert f"{dim}-d feature vector from vgg_fc7:" in text(driver, "features-meta")
    first = driver.find_element("css selector", "#neighbours li")
    # The image itself is in the gallery: its own nearest neighbour, similarity 1.
    assert first.find_element("class name", "label").text == digit["label"]
    assert first.find_element("class name", "value").text == "1.000"
    similarities = [float(e.text) for e in driver.find_elements("css selector", "#neighbours li .value")]
    assert similarities == sorted(similarities, reverse=True)
    assert_public_api_only(driver)


def stream_active(url: str, model: str) -> float:
    metrics = requests.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("nnserve_generation_streams_active{") and f'model="{model}"' in line)


def test_generation_streams_and_stop_frees_the_slot(driver, live_server):
    open_page(driver, live_server.http_url)
    model = driver.find_element("id", "generate-model").get_attribute("value")
    assert model in ("char_lstm", "char_gru")
    set_value(driver, "max-chars", "10000")
    set_value(driver, "temperature", "1")
    set_value(driver, "prompt", "The ")
    driver.find_element("id", "generate").click()
    output = "#generate-output .generated"
    length = lambda: js(driver, f"return document.querySelector('{output}').textContent.length")  # noqa: E731
    first = wait_for(length, "the first characters")
    wait_for(lambda: length() > first, "the text to grow")
    driver.find_element("id", "stop-generation").click()
    wait_for(lambda: "stopped" in text(driver, "generate-stats"), "the stream to stop")
    stopped_at = length()
    assert 0 < stopped_at < 10_000
    assert re.search(r"\d+ chars/s", text(driver, "generate-stats"))
    time.sleep(0.5)
    assert length() == stopped_at  # nothing more arrives
    wait_for(lambda: stream_active(live_server.http_url, model) == 0, "the server to free the stream's slot", 15)
    assert driver.find_element("id", "generate").is_enabled()
    assert_public_api_only(driver)


def test_generated_markup_is_shown_as_text(driver, live_server):
    open_page(driver, live_server.http_url)
    model = driver.find_element("id", "generate-model").get_attribute("value")
    vocab = set(served_vocab(live_server.http_url, model))
    hostile = '<script>document.title="pwned"</script><img src=x onerror="document.title=1">'
    prompt = "".join(ch for ch in hostile if ch in vocab)
    assert "<" in prompt and ">" in prompt, f"the test model's vocabulary lacks < or >: {sorted(vocab)}"
    title = driver.title
    set_value(driver, "prompt", prompt)
    set_value(driver, "max-chars", "1500")
    set_value(driver, "temperature", "3")  # near-uniform sampling: plenty of < > / = " in the text
    set_value(driver, "seed", "7")
    set_value(driver, "samples", "2")
    driver.find_element("id", "generate").click()
    wait_for(lambda: "done" in text(driver, "generate-stats"), "the end of the stream")
    samples = driver.find_elements("css selector", "#generate-output pre.sample")
    assert len(samples) == 2
    for sample in samples:
        assert js(driver, "return arguments[0].querySelector('.prompt').textContent", sample) == prompt
        generated = js(driver, "return arguments[0].querySelector('.generated').textContent", sample)
        assert len(generated) == 1500
        # Only text nodes: no element was made from the prompt or the model's output.
        assert js(driver, "return arguments[0].querySelectorAll('*').length", sample) == 2
    assert "3000 chars" in text(driver, "generate-stats")
    assert driver.title == title and not driver.find_elements("css selector", "img[src=x], script:not([src])")


def sse_text(stream: str) -> str:
    """The text of a /generate event stream: its unnamed events' data, in order."""
    events = [block for block in stream.split("\n\n") if block and not block.startswith("event:")]
    return "".join("\n".join(line.removeprefix("data: ") for line in block.split("\n")) for block in events)


def test_curl_commands_reproduce_the_page(driver, live_server, tmp_path):
    """Each panel shows its request as a curl command; run in a shell, it gets the page's answer."""
    path, label, _ = correct_held_out_digit(live_server.http_url, tmp_path)
    open_page(driver, live_server.http_url)
    set_value(driver, "classify-model", "lenet5")
    upload(driver, path)
    wait_for(lambda: top_prediction(driver)[0] == label, f"label {label} on top")
    command = js(driver, "return document.getElementById('classify-curl').textContent")  # in a closed <details>
    assert command.startswith("curl -s -F image=@your-image.png -F model=lenet5 ")
    run = subprocess.run(command.replace("your-image.png", str(path)), shell=True, capture_output=True, text=True,
                         timeout=60)
    assert json.loads(run.stdout)["predictions"][0]["label"] == label, run.stdout + run.stderr

    model = driver.find_element("id", "generate-model").get_attribute("value")
    vocab = set(served_vocab(live_server.http_url, model))
    set_value(driver, "prompt", "".join(ch for ch in 'A "test"\n' if ch in vocab))
    set_value(driver, "stop", "zq'x")  # never met; a ' the command must quote for the shell
    set_value(driver, "seed", "11")
    set_value(driver, "max-chars", "300")
    driver.find_element("id", "generate").click()
    wait_for(lambda: "done" in text(driver, "generate-stats"), "the end of the stream")
    page_text = js(driver, "return document.querySelector('#generate-output .generated').textContent")
    command = js(driver, "return document.getElementById('generate-curl').textContent")
    run = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and sse_text(run.stdout) == page_text, run.stdout[-500:] + run.stderr
    # Beside it, the same request through OpenAI's API with the official client: the same text.
    snippet = js(driver, "return document.getElementById('generate-openai').textContent")
    assert "client.completions.create(" in snippet and "seed=11" in snippet
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout == page_text + "\n", run.stdout[-500:] + run.stderr


def test_inline_script_is_refused_by_the_csp(driver, live_server):
    open_page(driver, live_server.http_url)
    driver.get_log("browser")  # drop what the load logged
    js(driver, "const s = document.createElement('script'); s.textContent = 'window.inlineRan = true';"
               "document.body.append(s);")
    assert js(driver, "return window.inlineRan === undefined")
    assert any("Content Security Policy" in entry["message"] for entry in driver.get_log("browser"))


def test_live_panel_updates_with_a_burst(driver, live_server):
    open_page(driver, live_server.http_url)
    set_value(driver, "burst-model", "lenet5")
    set_value(driver, "burst-count", "300")

    def lenet5_rate() -> float:  # read in one script call: the table is redrawn every second
        cell = js(driver, "const e = document.querySelector('#live-table tr[data-model=lenet5] td .value');"
                          "return e ? e.textContent : '–'")
        return float(cell) if cell != "–" else 0.0

    driver.find_element("id", "burst").click()
    # The burst's requests show as a rate for the second they fall in: watched from the click on.
    rates = []
    wait_for(lambda: rates.append(lenet5_rate()) or max(rates) > 0, "lenet5's request rate", 15)
    result = wait_for(lambda: (t := text(driver, "burst-result")).startswith("300 requests") and t,
                      "the burst's answers")
    assert "300 × 200" in result and "in batches of" in result, result
    sparklines = js(driver, "return document.querySelectorAll('#live-table tr[data-model=lenet5] canvas.spark').length")
    assert sparklines == 4
    assert_public_api_only(driver)


def test_api_error_is_a_message(driver, live_server):
    open_page(driver, live_server.http_url)
    set_value(driver, "prompt", "snow \u2603 man")
    driver.find_element("id", "generate").click()
    error = wait_for(lambda: driver.find_element("id", "generate-error").is_displayed()
                     and text(driver, "generate-error"), "the error message")
    assert error.startswith("400: ") and "outside the model vocabulary" in error and "U+2603" in error
    assert "failed" in text(driver, "generate-stats")


def test_token_versions_busy_server_upload_limit_and_waiting_model(driver, own_server, tiny_store, tmp_path):
    """An inference token typed into the page; two versions of a model, each chosen in the page and
    answering; a model still waiting for its export
    shown as such, not as an empty panel; an upload over the API's limit refused in the page, with the limit
    named, before anything is sent; 503 + Retry-After from the admission limit shown as a message."""
    limit = 2000
    versions = [store_copy(tiny_store["lenet5"], "glyphs").split(":")[1] for _ in range(2)]
    config = tmp_path / "models.yaml"
    # vgg_fc7 configured but not in the store: it waits (loading), as when make serve still builds it.
    config.write_text(json.dumps({"models": {
        "glyphs": {"tag": "glyphs", "version_policy": {"latest": {"num_versions": 2}}},
        "vgg_fc7": {"tag": "vgg_fc7_not_built"}, "char_gru": {"tag": tiny_store["char_gru"]}}}))
    token_file = tmp_path / "inference-token"
    token_file.write_text("playground-browser-token-0123456789")
    token_file.chmod(0o600)
    with own_server("playground-busy", {"NNSERVE_WORKERS": "1", "NNSERVE_MAX_CONCURRENT_REQUESTS": "1",
                                        "NNSERVE_MAX_UPLOAD_BYTES": str(limit), "NNSERVE_MODELS_CONFIG": str(config),
                                        "NNSERVE_VGG_FC7_TAG": "vgg_fc7_not_built",
                                        "NNSERVE_INFERENCE_TOKEN_FILE": str(token_file)}, "/livez") as live:
        # An inference token is set: the page loads, says why it has no models, and asks for the token.
        driver.get(live.http_url + "/playground")
        driver.execute_script("performance.setResourceTimingBufferSize(100000)")
        wait_for(lambda: "401" in text(driver, "server-status") or "token" in text(driver, "server-status"),
                 "GET /models refused")
        assert driver.find_element("id", "token-box").get_attribute("open") is not None
        driver.find_element("id", "token").send_keys("playground-browser-token-0123456789\n")
        wait_for(lambda: text(driver, "server-status").startswith("2 model(s) ready"), "the models, with the token")
        wait_for(lambda: "answered by glyphs:" in text(driver, "classify-meta"), "the first gallery digit classified")
        command = js(driver, "return document.getElementById('classify-curl').textContent")
        assert '"Authorization: Bearer $NNSERVE_TOKEN"' in command and "playground-browser-token" not in command
        options = [o.get_attribute("value") for o in driver.find_elements("css selector", "#classify-version option")]
        assert options == ["", *versions]
        for version in (versions[0], versions[1], versions[0]):
            set_value(driver, "classify-version", version)
            wait_for(lambda v=version: f"answered by glyphs:{v} " in text(driver, "classify-meta"),
                     f"an answer from version {version}")

        wait_for(lambda: "vgg_fc7 loading" in text(driver, "server-status"), "vgg_fc7 reported loading")
        hint = text(driver, "features-meta")
        assert "No model for this panel is served yet: vgg_fc7 is loading" in hint, hint
        option = driver.find_element("css selector", "#features-model option[value=vgg_fc7]")
        assert option.text == "vgg_fc7 (loading)" and not option.is_enabled()

        noise = tmp_path / "noise.png"
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
        noise.write_bytes(buffer.getvalue())
        sent_before = requested_paths(driver).count("/classify")
        driver.find_element("id", "file").send_keys(str(noise))
        error = wait_for(lambda: text(driver, "classify-error"), "the size message")
        assert f"the server's limit is {limit}" in error and str(noise.stat().st_size) in error
        assert requested_paths(driver).count("/classify") == sent_before

        set_value(driver, "burst-model", "char_gru")
        set_value(driver, "burst-count", "60")
        driver.find_element("id", "burst").click()
        wait_for(lambda: text(driver, "burst-result").startswith("60 requests"), "the burst's answers")
        assert "× 503" in text(driver, "burst-result")
        error = text(driver, "burst-error")
        assert error.startswith("503: server busy") and "retry after 1 s" in error, error


def test_page_fits_a_phone_screen(driver, live_server):
    driver.set_window_size(430, 900)
    try:
        open_page(driver, live_server.http_url)
        wait_for(lambda: len(driver.find_elements("css selector", "#classify-bars li")) == 5, "the first answer")
        width, visible = js(driver, "const e = document.documentElement; return [e.scrollWidth, e.clientWidth]")
        assert width <= visible, f"the page is {width} px wide in a {visible} px window: it scrolls sideways"
    finally:
        driver.set_window_size(1280, 900)
