"""`afina studio` in headless Chromium, as a new user drives it: upload data, fix the field mapping, see a
recipe error and fix it, prepare, train (watching the curve move), evaluate, export, chat with base and
tuned, rate and correct answers, and build the next training file. A screenshot of each view is saved
(to the test's folder; set AFINA_STUDIO_SCREENSHOTS=docs/studio to refresh the README's)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from serving import running_server

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 600  # stages are separate processes; on a loaded 2-core machine each can take a minute

pytestmark = pytest.mark.skipif(
    not CHROMIUM.is_file() or not Path(DRIVER).is_file(),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1100,860",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    yield driver
    driver.quit()


def save_screenshot(browser, folder: Path, name: str) -> None:
    """A PNG of the page, reduced to a 64-colour palette (a few tens of KB: text and lines)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if name != "new-run":  # that one shows the field with the error, where the page scrolled to
        browser.execute_script("window.scrollTo(0, 0)")
    raw = folder / f"{name}.raw.png"
    browser.save_screenshot(str(raw))
    Image.open(raw).convert("RGB").quantize(colors=64).save(folder / f"{name}.png", optimize=True)
    raw.unlink()


def test_data_file_to_chat_and_next_training_file_in_a_browser(browser, tiny_model_dir, tmp_path):
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from afina.studio.app import StudioSettings, create_app

    shots = Path(os.environ.get("AFINA_STUDIO_SCREENSHOTS") or tmp_path / "screenshots")
    data = tmp_path / "my_support_chats.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What does code {i % 6} mean? ({i})", "reply": f"Rinse for {i % 6 + 3} minutes."})
            + "\n"
            for i in range(24)
        )
    )
    settings = StudioSettings(runs_dir=tmp_path / "runs", data_dir=tmp_path / "empty")
    settings.data_dir.mkdir()
    wait = WebDriverWait(browser, WAIT_S, ignored_exceptions=[StaleElementReferenceException])

    def text(element_id: str) -> str:
        return browser.execute_script(
            f"const e = document.getElementById('{element_id}'); return e ? e.textContent : ''"
        )

    def until_text(element_id: str, expected: str) -> str:
        wait.until(lambda d: expected in text(element_id))
        return text(element_id)

    def until_job_done(stage: str) -> None:
        wait.until(lambda d: f"last job: {stage} finished" in text("job-state"))

    def fill(key: str, value: str) -> None:
        field = browser.find_element(By.ID, "f-" + key.replace(".", "-"))
        browser.execute_script(
            "arguments[0].closest('details') && (arguments[0].closest('details').open = true)", field
        )
        field.clear()
        field.send_keys(value)

    with running_server(create_app(settings)) as base:
        # 1. New run: upload the file; its fields are not a known shape, and the page says so.
        browser.get(base + "/new")
        browser.find_element(By.ID, "upload").send_keys(str(data))
        browser.find_element(By.ID, "upload-send").click()
        assert "cannot tell the schema" in until_text("schema-result", "columns: question, reply")
        # Fix the mapping: prompt <- question, completion <- reply.
        Select(browser.find_element(By.ID, "schema")).select_by_visible_text("prompt_completion")
        wait.until(lambda d: d.find_elements(By.ID, "map-completion"))
        Select(browser.find_element(By.ID, "map-prompt")).select_by_visible_text("question")
        Select(browser.find_element(By.ID, "map-completion")).select_by_visible_text("reply")
        browser.find_element(By.ID, "check-schema").click()
        until_text("schema-result", "schema prompt_completion (prompt=question, completion=reply)")
        assert "Rinse for 3 minutes." in text("schema-preview")

        # 2. The recipe form: a wrong value is shown beside its field, with the CLI's message; then fixed.
        browser.find_element(By.ID, "f-name").send_keys("support")
        fill("model.name", str(tiny_model_dir))
        for key, value in {
            # long enough that the page's once-a-second poll sees the curve grow even on a fast, quiet machine
            "training.max_steps": "120",
            "training.batch_size": "2",
            "training.precision": "fp32",
            "training.log_every": "1",
            "training.eval_every": "40",
            "eval.systems": "[base, tuned]",
            "eval.max_new_tokens": "4",
            "eval.risks.memorisation_rows": "0",
            "eval.risks.unanswerable_rows": "0",
            "eval.risks.resamples": "100",
            "export.formats": "[adapter]",
            "training.report_to": "[]",
        }.items():
            browser.execute_script(
                "const e = document.getElementById(arguments[0]); e.value = arguments[1];",
                "f-" + key.replace(".", "-"),
                value,
            )
        for key in ("training.plots", "eval.forgetting.enabled"):
            browser.execute_script(
                "document.getElementById(arguments[0]).checked = false", "f-" + key.replace(".", "-")
            )
        fill("training.learning_rate", "fast")
        browser.find_element(By.ID, "save-recipe").click()
        error = until_text("f-training-learning_rate-err", "Input should be a valid number")
        assert error.startswith("'training.learning_rate'") and "(given: 'fast')" in error
        assert browser.switch_to.active_element.get_attribute("id") == "f-training-learning_rate"  # focus on it
        save_screenshot(browser, shots, "new-run")
        fill("training.learning_rate", "0.01")
        browser.find_element(By.ID, "save-prepare").click()

        # 3. Prepare runs in the background; the report appears when it is done.
        until_job_done("prepare")
        assert "rows per step" in browser.page_source and "prompt=question, completion=reply" in browser.page_source
        save_screenshot(browser, shots, "prepare")
        saved = (settings.runs_dir / "support" / "recipe.yaml").read_text()
        assert "learning_rate: 0.01" in saved and "prompt: question" in saved

        # 4. Train: the curve grows while it runs.
        browser.find_element(By.LINK_TEXT, "Train").click()
        browser.find_element(By.CSS_SELECTOR, "button.start[data-stage=train]:not([data-resume])").click()
        seen = set()
        deadline = time.time() + WAIT_S
        while "last job: train finished" not in text("job-state") and time.time() < deadline:
            points = browser.execute_script(
                "const c = document.getElementById('loss-chart'); return c ? c.dataset.points : null"
            )
            if points:
                seen.add(int(points))
            time.sleep(0.2)
        assert len(seen) >= 2, f"the curve never updated while training ({seen})"
        wait.until(lambda d: text("live-step") == "120 / 120")
        save_screenshot(browser, shots, "train")

        # 5. Evaluate.
        browser.find_element(By.LINK_TEXT, "Evaluate").click()
        browser.find_element(By.CSS_SELECTOR, "button.start[data-stage=eval]").click()
        until_job_done("eval")
        assert "Systems × metrics" in browser.page_source and browser.find_elements(By.ID, "recommendation")
        save_screenshot(browser, shots, "eval")

        # 6. Export, each file verified.
        browser.find_element(By.LINK_TEXT, "Export").click()
        browser.find_element(By.CSS_SELECTOR, "button.start[data-stage=export]").click()
        until_job_done("export")
        assert "<strong>verified</strong>" in browser.page_source
        save_screenshot(browser, shots, "export")

        # 7. Chat with base and tuned side by side, rate one answer, correct the other, build the next file.
        browser.find_element(By.LINK_TEXT, "Chat").click()
        browser.find_element(By.ID, "load-model").click()
        until_text("chat-status", "loaded: support")
        browser.find_element(By.ID, "chat-prompt").send_keys("What does code 2 mean?\n")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done=true]")) == 2)
        base_answer, tuned_answer = browser.find_elements(By.CSS_SELECTOR, ".answer")
        base_answer.find_element(By.CSS_SELECTOR, "button[aria-label='rate: good answer']").click()
        wait.until(lambda d: "feedback recorded" in base_answer.text)
        tuned_answer.find_element(By.CSS_SELECTOR, "input.correction").send_keys("Rinse for 5 minutes.")
        tuned_answer.find_element(By.CSS_SELECTOR, "button.save-correction").click()
        wait.until(lambda d: "feedback recorded" in tuned_answer.text)
        browser.find_element(By.ID, "next-data").click()
        result = until_text("next-result", "wrote")
        assert "1 corrected" in result and "uploads/support-next.jsonl" in result
        save_screenshot(browser, shots, "chat")
        rows = [json.loads(line) for line in (settings.runs_dir / ".uploads" / "support-next.jsonl").open()]
        assert {"role": "assistant", "content": "Rinse for 5 minutes."} in [m for r in rows for m in r["messages"]]
        # The next run starts from that file, one click away.
        browser.find_element(By.LINK_TEXT, "start a new run from it").click()
        wait.until(lambda d: d.find_element(By.ID, "data-path").get_attribute("value") == "uploads/support-next.jsonl")

        # 8. The runs list.
        browser.get(base + "/")
        assert "✓ export" in browser.find_element(By.TAG_NAME, "table").text
        save_screenshot(browser, shots, "runs")
