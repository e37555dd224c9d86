"""The web chat page in a real browser (Debian's chromium, headless) against a real server."""

import shutil

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
if not (shutil.which("chromium") and shutil.which("chromedriver")):
    pytest.skip("Debian's chromium and chromium-driver are not installed (./run test installs them as root)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_idle(driver, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script("return document.body.dataset.busy") == "0")


def ask(driver, text):
    from selenium.webdriver.common.by import By
    box = driver.find_element(By.ID, "input")
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait_idle(driver)


def test_two_turn_conversation_in_the_browser(browser, server, local, api_key):
    from selenium.webdriver.common.by import By
    model, tokenizer = local
    browser.get(server + "/")
    browser.execute_script(f"localStorage.setItem('glmkit-api-key', '{api_key}')")
    browser.get(server + "/")
    browser.find_element(By.ID, "toggle-settings").click()
    max_tokens = browser.find_element(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("12")
    browser.find_element(By.ID, "temperature").clear()
    browser.find_element(By.ID, "temperature").send_keys("0")

    ask(browser, "你好")
    ask(browser, "What did I say?")
    messages = browser.execute_script("return window.glmkitChat.messages")
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    first, history = model.chat(tokenizer, "你好", do_sample=False, max_new_tokens=12)
    second, _ = model.chat(tokenizer, "What did I say?", history, do_sample=False, max_new_tokens=12)
    assert messages[1]["content"] == first and messages[3]["content"] == second  # the history reached the model
    bubbles = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
    assert len(bubbles) == 2 and all(b.text.strip() for b in bubbles)

    browser.find_element(By.ID, "new-chat").click()
    assert browser.execute_script("return window.glmkitChat.messages.length") == 0
    assert not browser.find_elements(By.CSS_SELECTOR, ".msg")


def test_page_renders_markdown_and_escapes_html(browser, server):
    browser.get(server + "/")
    html = browser.execute_script("return renderMarkdown('**b** `x<y>`\\n\\n```py\\nprint(1)\\n```\\n\\n- a\\n- b')")
    assert "<strong>b</strong>" in html and "<code>x&lt;y&gt;</code>" in html
    assert '<pre><code class="language-py">print(1)\n</code></pre>' in html and "<ul><li>a</li><li>b</li></ul>" in html
    assert "<script>" not in browser.execute_script("return renderMarkdown('<script>alert(1)</script>')")


def test_page_switches_language(browser, server):
    from selenium.webdriver.common.by import By
    browser.get(server + "/")
    before = browser.find_element(By.ID, "send").text
    browser.find_element(By.ID, "toggle-lang").click()
    after = browser.find_element(By.ID, "send").text
    assert {before, after} == {"Send", "发送"}
