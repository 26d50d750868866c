"""The playground page in a real browser: Debian's Chromium, headless, driven by Selenium through Debian's
chromedriver (no driver download). Loads /playground from a live server, uploads an adapter through the
page's form, runs two adapters and the bare model on one prompt, and checks that the three columns fill
with the tokens the API returns for those requests. The screenshot is kept as a test artefact
(test-artifacts/playground.png). Skips, saying why, where Chromium or its driver is not installed
(`make test` installs Debian's `chromium` and `chromium-driver` where it can).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import LiveServer, fixture_dir, upload_files

ROOT = Path(__file__).resolve().parents[2]
ARTEFACTS = ROOT / "test-artifacts"


def browser():  # noqa: ANN201
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (make install)")
    chrome, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not chrome or not driver:
        pytest.skip("Chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def wait(cond, timeout: float = 60.0, what: str = "") -> None:  # noqa: ANN001
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def chrome():
    d = browser()  # skips, saying why, where there is none
    yield d
    d.quit()


@pytest.fixture
def server(tmp_path):
    s = LiveServer(tmp_path / "store")
    yield s
    s.close()


def test_the_playground_uploads_and_compares_two_adapters_and_the_bare_model(chrome, server, tmp_path):
    from selenium.webdriver.common.by import By

    assert httpx.post(server.url + "/adapters", data={"adapter_id": "seq"},
                      files=upload_files(fixture_dir("seq_bn"))).status_code == 201
    d = chrome
    d.get(server.url + "/playground/")
    wait(lambda: d.find_elements(By.CSS_SELECTOR, "#adapter-rows tr[data-adapter=seq]"), what="the adapters table")

    # upload through the page's form: the files of a saved PEFT LoRA folder
    files = sorted(str(p) for p in fixture_dir("lora_qv").iterdir() if p.is_file())
    d.find_element(By.ID, "files").send_keys("\n".join(files))
    d.find_element(By.ID, "adapter-id").send_keys("lo")
    d.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    wait(lambda: d.find_elements(By.CSS_SELECTOR, "#adapter-rows tr[data-adapter=lo]"), what="the uploaded adapter")
    assert httpx.get(server.url + "/adapters/lo").json()["method"] == "lora"
    assert "uploaded lo" in d.find_element(By.ID, "upload-status").text

    # two adapters and the bare model, side by side
    prompt = "the quick brown fox"
    box = d.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    n = d.find_element(By.ID, "max-new-tokens")
    n.clear()
    n.send_keys("10")
    d.find_element(By.ID, "ignore-eos").click()
    for a in ("lo", "seq"):
        d.find_element(By.CSS_SELECTOR, f".choice[value='{a}']").click()
    d.find_element(By.ID, "run").click()
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, ".column[data-done='1']")) == 3, what="three columns")
    cols = {c.get_attribute("data-adapter"): c for c in d.find_elements(By.CSS_SELECTOR, ".column")}
    assert set(cols) == {"", "lo", "seq"}
    got = {a: json.loads(c.get_attribute("data-token-ids")) for a, c in cols.items()}
    for a, c in cols.items():
        want = httpx.post(server.url + "/generate", json={"prompt": prompt, "adapter_id": a or None,
                                                          "max_new_tokens": 10, "ignore_eos": True}).json()
        assert got[a] == want["token_ids"], a
        assert c.find_element(By.CSS_SELECTOR, ".text").text == want["text"].strip()
        assert "10 tokens" in c.find_element(By.CSS_SELECTOR, ".stats").text
    assert len({tuple(t) for t in got.values()}) == 3  # three different answers: each column its own adapter

    wait(lambda: d.find_element(By.ID, "m-batch").text not in ("", "-"), timeout=10, what="the live panel")
    d.find_element(By.ID, "demo").click()  # the demo adapters, for a first look without files at hand
    wait(lambda: len(d.find_elements(By.CSS_SELECTOR, "#adapter-rows tr[data-adapter^=demo-]")) == 3, what="demos")
    assert {a["method"] for a in httpx.get(server.url + "/adapters").json()["adapters"]} == {"ia3", "lora", "bottleneck"}
    again = httpx.post(server.url + "/adapters/demo")
    assert again.status_code == 201 and again.json() == {"adapters": []}  # ids taken: nothing replaced
    ARTEFACTS.mkdir(exist_ok=True)
    assert d.save_screenshot(str(ARTEFACTS / "playground.png"))


def test_the_playground_asks_for_the_key_and_keeps_it_in_the_tab(chrome, tmp_path):
    from selenium.webdriver.common.by import By

    d = chrome
    s = LiveServer(tmp_path / "store", api_key="user-key", admin_api_key="user-key")
    try:
        d.get(s.url + "/playground/")
        box = d.find_element(By.ID, "key-box")
        wait(lambda: box.is_displayed(), what="the key field")  # /adapters answered 401
        key = d.find_element(By.ID, "api-key")
        key.send_keys("user-key\n")
        d.execute_script("document.getElementById('api-key').dispatchEvent(new Event('change'))")
        httpx.post(s.url + "/adapters", data={"adapter_id": "ia"}, files=upload_files(fixture_dir("ia3_default")),
                   headers={"Authorization": "Bearer user-key"})
        d.execute_script("loadAdapters()")
        wait(lambda: d.find_elements(By.CSS_SELECTOR, "#adapter-rows tr[data-adapter=ia]"), what="the table with the key")
        stored = d.execute_script("return JSON.stringify(localStorage) + JSON.stringify(sessionStorage) + document.cookie")
        assert "user-key" not in stored
    finally:
        s.close()
