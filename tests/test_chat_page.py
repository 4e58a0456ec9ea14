"""The chat page at / in headless Chromium: pick an adapter, type a message, watch the answer stream in."""

import shutil
from pathlib import Path

import pytest

from serving import make_adapter, running_server

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file() or not Path(DRIVER).is_file(),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_page_streams_an_answer_from_the_picked_adapter(browser, tiny_model_dir, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from afina.config import ServeConfig
    from afina.serve.app import create_app
    from afina.serve.models import load_served

    adapter = make_adapter(tiny_model_dir, tmp_path / "kettle", 1)
    served = load_served(str(tiny_model_dir), {"kettle": str(adapter)})
    with running_server(create_app(served, ServeConfig(log_dir=str(tmp_path / "logs")))) as base:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
        picker = Select(browser.find_element(By.ID, "model"))
        assert [o.get_attribute("value") for o in picker.options] == ["kettle", tiny_model_dir.name]
        picker.select_by_value("kettle")
        browser.find_element(By.ID, "max-tokens").clear()
        browser.find_element(By.ID, "max-tokens").send_keys("12")
        browser.find_element(By.ID, "prompt").send_keys("How do I descale my kettle?\n")
        done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".turn.assistant[data-done='true'] span"))
        shown = done[0].text
        assert browser.find_element(By.CSS_SELECTOR, ".turn.user span").text == "How do I descale my kettle?"
        assert not browser.find_elements(By.CSS_SELECTOR, ".turn.error")

        # What the page showed is what the server streamed (the request log holds it).
        import json

        logged = json.loads((tmp_path / "logs" / "requests.jsonl").read_text().splitlines()[-1])
        assert logged["model"] == "kettle" and logged["stream"] is True and logged["usage"]["completion_tokens"] > 0
        assert shown == logged["answer"].strip()
        assert logged["messages"] == [{"role": "user", "content": "How do I descale my kettle?"}]
