"""The playground page at `/`: its files and `GET /v1/info` over plain HTTP, then the page itself in a
real headless Chromium (Selenium, Debian's chromium and chromedriver) against the real gateway and
Triton: a generation followed step by step, a cancelled job, a bad input, the API key field."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from sd_triton.contract import SCHEDULERS
from sd_triton.gateway.process import GatewayProcess

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = ROOT / ".cache" / "sd-triton" / "playground.png"
FORM_IDS = ("prompt", "negative_prompt", "width", "height", "steps", "guidance_scale", "seed", "scheduler",
            "prompt_syntax", "clip_skip", "api_key", "generate", "cancel")  # fmt: skip
STEP_TEXT = re.compile(r"^step (\d+) / (\d+)$")

# Records what the page shows over time: the step text, the status and whether a step preview is in
# place, after every change to the output section (a MutationObserver sees each rendered state).
RECORD_JS = """
window.shown = [];
const output = document.getElementById("output");
const record = () => window.shown.push({
  step: document.getElementById("step-text").textContent,
  status: document.getElementById("status").textContent,
  preview: (document.getElementById("preview") || {}).src || null,
});
new MutationObserver(record).observe(output, {subtree: true, childList: true, characterData: true,
                                              attributes: true});
"""


# ---------- plain HTTP ----------


def test_page_and_its_files(http: httpx.Client) -> None:
    page = http.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for element_id in FORM_IDS:
        assert f'id="{element_id}"' in page.text, element_id
    assert 'src="static/app.js"' in page.text and 'href="static/style.css"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing from outside the gateway

    script = http.get("/static/app.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert "v1/jobs" in script.text and "https://" not in script.text
    style = http.get("/static/style.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")

    for path in ("/static/missing.js", "/static/__init__.py", "/static/..%2Fmain.py", "/static/"):
        response = http.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["type"] == "invalid_request", path


def test_info_has_the_served_model_limits_and_defaults(http: httpx.Client, client: Any) -> None:
    response = http.get("/v1/info")
    assert response.status_code == 200, response.text
    info = response.json()
    config = client.get_model_config("txt2img", as_json=True)["config"]["parameters"]
    assert info["model"] == "tiny" == config["model"]["string_value"]
    assert (info["native_width"], info["native_height"]) == (64, 64)  # the tiny model's native size
    assert info["limits"] == {
        "max_side": 1024,  # the export's default limits
        "spatial_multiple": int(config["spatial_multiple"]["string_value"]),
        "max_steps": 150,
        "max_images": 4,
        "max_pixels": 1024 * 1024,  # the gateway's default
        "max_prompt_chars": 2000,
        "max_loras": 4,
        "max_lora_scale": 4.0,
    }
    assert info["schedulers"] == list(SCHEDULERS)
    assert info["defaults"] == {
        "width": 64,
        "height": 64,
        "steps": 30,
        "guidance_scale": 7.5,
        "scheduler": "default",  # the checkpoint's own, named below
        "num_images": 1,
        "output_format": "png",
    }
    assert info["default_scheduler_class"] == "PNDMScheduler"  # the tiny checkpoint's scheduler_config.json
    assert "/v1/info" in http.get("/openapi.json").json()["paths"]
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [info["model"]]
    assert models["data"][0]["default_scheduler_class"] == "PNDMScheduler"
    assert models["data"][0]["schedulers"] == list(SCHEDULERS)


def test_static_files_are_package_data() -> None:
    """An installed gateway (not only this checkout) carries the page: pyproject's package-data globs
    cover every file in gateway/static."""
    import fnmatch

    import tomllib

    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = [p.relative_to(ROOT / "gateway").as_posix() for p in (ROOT / "gateway" / "static").iterdir()]
    assert {"static/index.html", "static/app.js", "static/style.css"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(name, pattern) for pattern in globs["sd_triton.gateway"]), name


# ---------- in the browser ----------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail(
            f"{CHROMIUM} and {CHROMEDRIVER} are needed for the playground tests: run `make system-deps`"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run `make setup` (or pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(argument)
    # the network off: no host but this machine resolves (a page that needs a CDN stays blank)
    options.add_argument("--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")
    # the console (JavaScript errors) and the network events (the request headers the page sends)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # the chromedriver path given explicitly: Selenium Manager never looks for one on the network
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    log.info("browser: %s %s", driver.capabilities["browserName"], driver.capabilities["browserVersion"])
    yield driver
    driver.quit()


class Playground:
    """The page in the browser, seen and driven the way a person would."""

    def __init__(self, driver: Any, url: str) -> None:
        self.driver = driver
        self.url = url

    def open(self, wait_for_info: bool = True) -> Playground:
        self.driver.get(self.url + "/")
        if wait_for_info:
            self.wait(self.has_info, 30, "the form built from /v1/info")
        return self

    def has_info(self) -> bool:
        """The form is built from /v1/info: the scheduler options appear once it is read."""
        return len(self.driver.find_elements("css selector", "#scheduler option")) > 0

    def el(self, element_id: str) -> Any:
        return self.driver.find_element("id", element_id)

    def text(self, element_id: str) -> str:
        return str(self.el(element_id).text)

    def fill(self, **fields: str | int) -> None:
        for name, value in fields.items():
            element = self.el(name)
            element.clear()
            element.send_keys(str(value))

    def wait(self, condition: Callable[[], Any], timeout_s: float, what: str = "") -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.05)
        raise AssertionError(
            f"timed out after {timeout_s} s waiting for {what or condition}; "
            f"status: {self.text('status')!r}, error: {self.el('error').get_attribute('textContent')!r}"
        )

    def start_recording(self) -> None:
        self.driver.execute_script(RECORD_JS)

    def recorded(self) -> list[dict[str, Any]]:
        return list(self.driver.execute_script("return window.shown"))

    def console(self) -> list[dict[str, Any]]:
        entries = list(self.driver.get_log("browser"))
        for entry in entries:
            log.info("browser console %s: %s", entry["level"], entry["message"])
        return entries

    def requests_to(self, path: str) -> list[dict[str, Any]]:
        """The requests the page sent to `path` since the last call, from Chrome's network log."""
        sent = []
        for entry in self.driver.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent":
                request = message["params"]["request"]
                if httpx.URL(request["url"]).path == path:
                    sent.append(request)
        return sent


@pytest.fixture
def page(browser: Any, gateway: GatewayProcess) -> Iterator[Playground]:
    browser.get(gateway.url + "/")
    browser.execute_script("localStorage.clear()")
    playground = Playground(browser, gateway.url).open()
    browser.get_log("performance")  # start the network log afresh
    yield playground
    playground.console()  # into the test's log


def steps_shown(records: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """The distinct "step i / N" values the page showed, in order."""
    values: list[tuple[int, int]] = []
    for record in records:
        match = STEP_TEXT.match(record["step"])
        if match and int(match.group(2)) > 0:
            step = (int(match.group(1)), int(match.group(2)))
            if not values or values[-1] != step:
                values.append(step)
    return values


def decode(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def test_generate_shows_progress_then_the_image(page: Playground, http: httpx.Client, tmp_path: Path) -> None:
    steps, side = 8, 128  # 128 px: the tiny model's steps take long enough to be seen one by one
    # the form came with the served model's defaults (from /v1/info)
    form = {name: page.el(name).get_attribute("value") for name in ("width", "height", "steps", "scheduler")}
    assert form == {"width": "64", "height": "64", "steps": "30", "scheduler": "default"}
    page.fill(prompt="a red circle on a blue background", steps=steps, width=side, height=side)
    from selenium.webdriver.support.select import Select

    Select(page.el("scheduler")).select_by_value("ddim")  # one UNet call per step (PNDM, the default: N + 1)
    page.start_recording()
    page.el("generate").click()

    page.wait(lambda: page.driver.find_elements("css selector", "#images img.result"), 120, "the final image")
    image = page.driver.find_element("css selector", "#images img.result")
    page.wait(lambda: page.driver.execute_script("return arguments[0].complete", image), 10, "image decoded")
    natural = page.driver.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image
    )
    assert natural == [side, side]
    assert page.text("status").startswith("Done in")
    assert page.text("details").startswith("Timings: ")
    assert page.el("generate").is_enabled() and not page.el("cancel").is_enabled()

    # the progress the page showed over time: several values, increasing, ending at N
    records = page.recorded()
    shown = steps_shown(records)
    log.info("steps shown: %s", shown)
    assert len(shown) > 1, shown
    assert all(total == steps for _, total in shown), shown
    assert [step for step, _ in shown] == sorted({step for step, _ in shown}), shown
    assert shown[-1] == (steps, steps)
    assert page.el("progress").get_attribute("value") == str(steps)
    previews = {r["preview"] for r in records if r["preview"]}
    assert previews, "no step preview was shown"
    assert all(src.startswith("data:image/") for src in previews)

    # the seed shown is the image's: the same request with it through /v1/generate gives the same pixels
    seed_text = page.driver.find_element("css selector", "#images .seed").text
    seed = int(seed_text.removeprefix("seed "))
    again = http.post(
        "/v1/generate",
        json={
            "prompt": "a red circle on a blue background",
            "steps": steps,
            "seed": seed,
            "width": side,
            "height": side,
            "scheduler": "ddim",
        },
    ).json()["images"][0]
    np.testing.assert_array_equal(
        decode(image.get_attribute("src")), decode("data:image/png;base64," + again["base64"])
    )

    severe = [e for e in page.console() if e["level"] == "SEVERE"]
    assert not severe, severe

    for path in (tmp_path / "playground.png", SCREENSHOT):
        path.parent.mkdir(parents=True, exist_ok=True)
        assert page.driver.save_screenshot(str(path)), path
        log.info("playground screenshot: %s", path)
    with Image.open(SCREENSHOT) as screenshot:
        assert screenshot.size[0] > 600


def test_cancel(page: Playground, http: httpx.Client, tmp_path: Path) -> None:
    page.fill(prompt="a long one", steps=150, width=128, height=128)
    page.start_recording()
    page.el("generate").click()
    # running: a few steps shown (with their preview), then Cancel
    page.wait(lambda: len(steps_shown(page.recorded())) >= 2, 60, "the first steps")
    for path in (tmp_path / "playground-running.png", SCREENSHOT.with_name("playground-running.png")):
        assert page.driver.save_screenshot(str(path)), path
        log.info("playground while running: %s", path)
    page.el("cancel").click()
    page.wait(lambda: page.text("status") == "Cancelled.", 30, "the page to show cancelled")

    job_id = page.text("job-id")
    assert job_id
    status = http.get(f"/v1/jobs/{job_id}").json()
    assert status["status"] == "cancelled", status
    assert status["progress"]["step"] < 150, status
    shown = steps_shown(page.recorded())
    log.info("steps shown before the cancel: %s", shown)
    assert shown[-1][0] < 150, shown
    assert not page.driver.find_elements("css selector", "#images img.result")
    assert page.el("generate").is_enabled() and not page.el("cancel").is_enabled()


def test_bad_input_shows_the_gateway_message(page: Playground, http: httpx.Client) -> None:
    page.fill(prompt="too wide", width=1_000_000)
    page.el("generate").click()
    error = page.wait(lambda: page.el("error").is_displayed() and page.el("error"), 30, "the error message")
    message = error.text
    log.info("error shown: %s", message)
    assert message.startswith("width") and "1000000" in message, message
    answer = http.post("/v1/jobs", json={"prompt": "too wide", "width": 1_000_000})
    assert answer.status_code == 422 and answer.json()["error"]["message"] == message  # the gateway's own
    assert page.el("width").get_attribute("aria-invalid") == "true"  # the field it names is marked
    assert page.text("status") == "Failed."
    assert page.el("generate").is_enabled() and not page.el("cancel").is_enabled()
    assert not page.driver.find_elements("css selector", "#images img")


def test_an_uploaded_image_and_a_painted_mask_inpaint(
    page: Playground, http: httpx.Client, tmp_path: Path
) -> None:
    """Upload an image, paint a mask over part of it, set the strength: the job inpaints (its details say
    so), and /v1/generate with the same image, the mask the page sent and the seed shown gives the same
    pixels. Removing the image goes back to text-to-image."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.select import Select

    picture = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    path = tmp_path / "start.png"
    Image.fromarray(picture).save(path)
    page.el("image").send_keys(str(path))
    page.wait(lambda: page.el("mask-box").is_displayed(), 10, "the image and its mask canvas")
    assert [page.el(n).get_attribute("value") for n in ("width", "height")] == ["64", "48"]  # its size
    canvas = page.el("mask-canvas")
    page.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)  # a person scrolls
    box = canvas.size
    stroke = ActionChains(page.driver).move_to_element_with_offset(canvas, -box["width"] // 4, 0)
    stroke.click_and_hold().move_by_offset(box["width"] // 3, box["height"] // 5).release().perform()
    mask_src = page.driver.execute_script("return maskDataUrl()")
    mask = decode(mask_src)[..., 0]
    assert 0 < (mask > 127).mean() < 0.5 and set(np.unique(mask)) >= {0, 255}  # painted, not all of it
    page.fill(prompt="a green door", steps=6, strength="0.9")
    Select(page.el("scheduler")).select_by_value("ddim")
    page.el("generate").click()
    page.wait(
        lambda: page.driver.find_elements("css selector", "#images img.result"), 120, "the inpainted image"
    )
    assert page.text("details").endswith("Mode: inpainting."), page.text("details")
    seed = int(page.driver.find_element("css selector", "#images .seed").text.removeprefix("seed "))
    shown = decode(page.driver.find_element("css selector", "#images img.result").get_attribute("src"))
    body = {
        "prompt": "a green door", "steps": 6, "strength": 0.9, "scheduler": "ddim", "seed": seed,
        "image": base64.b64encode(path.read_bytes()).decode(), "mask": mask_src,
    }  # fmt: skip
    again = http.post("/v1/generate", json=body).json()["images"][0]
    np.testing.assert_array_equal(shown, decode("data:image/png;base64," + again["base64"]))

    page.el("remove-image").click()
    assert not page.el("mask-box").is_displayed()
    page.el("generate").click()
    page.wait(lambda: page.text("details").endswith("Mode: text-to-image."), 120, "a text-to-image result")
    page.fill(strength="0.5")
    page.el("generate").click()
    error = page.wait(lambda: page.el("error").is_displayed() and page.el("error"), 10, "the strength error")
    assert error.text.startswith("strength: applies to an image"), error.text


def test_api_key_is_kept_and_sent(page: Playground) -> None:
    page.fill(api_key="sk-playground-test")
    page.open()  # a reload: the key comes back from localStorage and goes with the page's requests
    assert page.el("api_key").get_attribute("value") == "sk-playground-test"
    sent = page.requests_to("/v1/info")
    assert sent and all(r["headers"].get("Authorization") == "Bearer sk-playground-test" for r in sent), sent

    page.el("api_key").clear()
    page.el("api_key").send_keys(" ")  # blank: the key is forgotten
    page.open()
    assert page.el("api_key").get_attribute("value") == ""
    sent = page.requests_to("/v1/info")
    assert sent and not any("Authorization" in r["headers"] for r in sent), sent


SSE_STREAM = (
    ": keep-alive\r\n\r\n"
    'event: queued\r\ndata: {"id": "j1", "position": 0}\r\n\r\n'
    'event: step\ndata: {"id": "j1",\ndata:  "step": 1}\n\n'
    "event:completed\rdata:{}\r\r"
    "event: step\ndata: {}"  # the stream ends inside this one: dropped
)
SSE_EVENTS = [
    {"event": "queued", "data": '{"id": "j1", "position": 0}'},
    {"event": "step", "data": '{"id": "j1",\n "step": 1}'},
    {"event": "completed", "data": "{}"},
]


def test_event_stream_parser_any_chunking(page: Playground) -> None:
    """The page's own SSE parser: CRLF, LF and CR line endings (a bare CR ending the stream included),
    comments, multi-line data, an unfinished event at the end; the stream cut into chunks at every
    position (a CRLF split between two chunks included) gives the same events."""
    events = page.driver.execute_script(
        """
        const [text] = arguments;
        const results = [];
        for (let cut = 0; cut <= text.length; cut++) {
          const parser = new SseParser();
          results.push([...parser.push(text.slice(0, cut)), ...parser.push(text.slice(cut)),
                        ...parser.push("", true)]);
        }
        const bytewise = new SseParser();
        results.push([...[...text].flatMap((char) => bytewise.push(char)), ...bytewise.push("", true)]);
        return results;
        """,
        SSE_STREAM,
    )
    assert len(events) == len(SSE_STREAM) + 2
    for got in events:
        assert got == SSE_EVENTS


@pytest.fixture(scope="module")
def keyed_gateway(
    triton: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[GatewayProcess, str]]:
    """A second gateway with one API key configured: (the process, the key's token)."""
    from sd_triton.gateway.access.keys import create_key
    from tests.conftest import free_port

    folder = tmp_path_factory.mktemp("keyed-gateway")
    token = create_key(folder / "keys.json", "playground").token
    env = {"SD_GATEWAY_KEYS_FILE": str(folder / "keys.json")}
    process = GatewayProcess(triton.grpc_url, port=free_port(), log_file=folder / "gateway.log", env=env)
    process.start()
    yield process, token
    process.stop()


def test_with_api_keys_the_page_needs_the_key(
    browser: Any, keyed_gateway: tuple[GatewayProcess, str]
) -> None:
    gateway, token = keyed_gateway
    browser.get(gateway.url + "/")
    browser.execute_script("localStorage.clear()")
    page = Playground(browser, gateway.url).open(wait_for_info=False)  # the page itself needs no key
    page.wait(lambda: "Could not read" in page.text("model-info"), 30, "the /v1/info error")
    refused = httpx.get(gateway.url + "/v1/info")
    assert refused.status_code == 401
    assert page.text("model-info").endswith(refused.json()["error"]["message"]) and not page.has_info()

    page.fill(prompt="a keyed request", api_key="sdk_nobody_wrong")
    page.el("generate").click()
    page.wait(lambda: page.el("error").is_displayed(), 30, "the 401 message")
    refused = httpx.get(gateway.url + "/v1/info", headers={"Authorization": "Bearer sdk_nobody_wrong"})
    assert refused.status_code == 401 and page.text("error") == refused.json()["error"]["message"]

    page.fill(api_key=token)
    page.el("prompt").click()  # leaving the key field: the form is read again, with the key
    page.wait(page.has_info, 30, "the form built from /v1/info with the key")
    page.fill(steps=4)
    assert page.text("model-info").startswith("model tiny")
    page.el("generate").click()
    page.wait(lambda: page.driver.find_elements("css selector", "#images img.result"), 120, "the image")
    assert not page.el("error").is_displayed()


@pytest.mark.parametrize(("path", "rendered"), [("/docs", ".opblock"), ("/redoc", "[data-section-id]")])
def test_api_docs_render_with_the_network_off(browser: Any, gateway, path: str, rendered: str) -> None:
    """Swagger UI and ReDoc come from the gateway itself (no CDN): with every host but this machine
    unresolvable, the pages draw the routes."""
    browser.get(gateway.url + path)
    deadline = time.monotonic() + 30
    while len(found := browser.find_elements("css selector", rendered)) < 5:
        assert time.monotonic() < deadline, f"{path} drew {len(found)} routes within 30 s"
        time.sleep(0.2)
    assert "/v1/generate" in browser.find_element("tag name", "body").text
    scripts = [s.get_attribute("src") for s in browser.find_elements("tag name", "script")]
    assert all(src.startswith(gateway.url) for src in scripts if src), scripts
