"""Screenshots of the playground's panels for the docs (docs/img/playground-*.png, README's first screen):
``make screenshots`` with a server running (``make serve``). Headless Chromium, as the browser tests.

    python -m harness.screenshots --url http://localhost:3000 --out docs/img

It shows what a person sees in the first minute: a held-out digit classified and its nearest gallery digits,
a streamed sample, and the live panel after a few bursts.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import requests

from harness.browser import chromium, missing_reason
from harness.data import held_out_digits, png_bytes

WAIT_S = 120.0


def wait_for(condition, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception:  # noqa: BLE001 - not rendered yet
            pass
        time.sleep(0.1)
    raise SystemExit(f"timed out after {timeout} s waiting for {what}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://localhost:3000")
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    parser.add_argument("--digit", type=int, default=3, help="index of the held-out digit to classify")
    args = parser.parse_args(argv)
    if missing_reason():
        raise SystemExit(f"cannot take screenshots: {missing_reason()}")
    models = {m["name"]: m for m in requests.get(args.url + "/models", timeout=30).json()["models"]}
    not_ready = [name for name, m in models.items() if m["state"] != "ready"]
    if not_ready:
        raise SystemExit(f"wait until every model is served (not yet: {', '.join(not_ready)}; GET /readyz says why)")
    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = held_out_digits()
    digit = args.out / "held-out-digit.png"  # deleted below: only the screenshots stay
    digit.write_bytes(png_bytes(images[args.digit]))
    driver = chromium(1280, 1000)
    try:
        driver.get(args.url + "/playground")
        wait_for(lambda: driver.find_element("id", "server-status").text[:1].isdigit(), "GET /models")
        # The page opens with a gallery digit and computes the gallery's vectors: a person uploads after that.
        wait_for(lambda: len(driver.find_elements("css selector", "#neighbours li")) == 8, "the first neighbours")
        driver.execute_script("for (const id of ['neighbours', 'classify-bars']) document.getElementById(id)"
                              ".replaceChildren()")  # so the waits below see the upload's answers
        driver.find_element("id", "file").send_keys(str(digit.resolve()))
        wait_for(lambda: digit.name in driver.find_element("id", "preview-caption").text, "the upload")
        wait_for(lambda: len(driver.find_elements("css selector", "#neighbours li")) == 8, "the neighbours")
        wait_for(lambda: driver.find_elements("css selector", "#classify-bars li"), "the classes")
        print(f"classified a held-out {labels[args.digit]}:", driver.find_element("id", "classify-meta").text)

        script = ("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                  "e.dispatchEvent(new Event('change'))")
        for field, value in (("prompt", "ROMEO:\n"), ("seed", "3"), ("max-chars", "500"), ("samples", "1")):
            driver.execute_script(script, field, value)
        driver.find_element("id", "generate").click()
        wait_for(lambda: "done" in driver.find_element("id", "generate-stats").text, "the generated text")

        driver.execute_script(script, "burst-model", next(iter(models)))
        driver.execute_script(script, "burst-count", "1000")
        for pause in (3, 3, 0):  # bursts a few seconds apart: the sparklines show them
            driver.execute_script("document.getElementById('burst-result').textContent = ''")
            driver.find_element("id", "burst").click()
            wait_for(lambda: "requests to" in driver.find_element("id", "burst-result").text, "the burst")
            time.sleep(pause)

        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, height + 100)
        time.sleep(0.5)
        shots = {"playground-image": "image-panel", "playground-classify": "classify-panel",
                 "playground-features": "features-panel", "playground-generate": "generate-panel",
                 "playground-live": "live-panel"}
        for name, element in shots.items():
            path = args.out / f"{name}.png"
            driver.find_element("id", element).screenshot(str(path))
            print("wrote", path)
        driver.set_window_size(1280, 1200)  # the README's picture: down to the generated text
        driver.execute_script("window.scrollTo(0, 0)")
        driver.save_screenshot(str(args.out / "playground.png"))
        print("wrote", args.out / "playground.png")
    finally:
        driver.quit()
        digit.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
