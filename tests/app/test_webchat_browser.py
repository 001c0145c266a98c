"""The web chat in Debian's headless Chromium, against the real service process.

A person pastes a chat token, connects, sends a message and watches the reply stream in
from the Claude stand-in (slowly, so partial text must show before the reply is done). The
page must log no errors, break no Content-Security-Policy rule and fetch nothing but the
service itself. A screenshot goes to artifacts/webchat.png.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from playwright.async_api import BrowserContext, ConsoleMessage, Page, Route, async_playwright

from standins.anthropic_api import AnthropicStandin, Reply
from tests.support.process import (
    ServiceProcess,
    prepare_database,
    run_cli,
    running_service_async,
    service_env,
)

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
# Keep Chromium off the network: no first-run, sync, updates, field trials or QUIC probes.
CHROMIUM_ARGS = [
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-domain-reliability",
    "--no-default-browser-check",
    "--metrics-recording-only",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
VIEWPORT = {"width": 1280, "height": 800}
TIMEOUT_MS = 60_000

QUESTION = "Hello Mara! How is the vegetable garden doing this year?"
ANSWER = f"Stand-in reply to: {QUESTION}"
CHUNK_DELAY = 0.2

# Runs before any page script: CSP violations are reported to the page as DOM events.
RECORD_CSP = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
"""


@dataclass
class Browser:
    page: Page
    service: ServiceProcess
    standin: AnthropicStandin
    chat_token: str
    console: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    foreign_requests: list[str] = field(default_factory=list)

    async def csp_violations(self) -> list[str]:
        found: list[str] = await self.page.evaluate("window.__cspViolations")
        return found

    async def assert_clean(self, *, allowed_console: tuple[str, ...] = ()) -> None:
        console = [m for m in self.console if not any(a in m for a in allowed_console)]
        assert console == []
        assert self.page_errors == []
        assert await self.csp_violations() == []
        assert self.foreign_requests == []


@pytest.fixture
async def browser(tmp_path: Path, standin: AnthropicStandin) -> AsyncIterator[Browser]:
    env = service_env(tmp_path, anthropic_base_url=standin.base_url)
    prepare_database(env)
    for args in (["token", "create", "--name", "web tester", "--scope", "chat", "--quiet"],):
        result = run_cli(args, env)
        assert result.returncode == 0, result.stderr
    chat_token = result.stdout.strip()
    args = [*CHROMIUM_ARGS, *(["--no-sandbox"] if os.geteuid() == 0 else [])]
    async with running_service_async(env, tmp_path) as service, async_playwright() as pw:
        context: BrowserContext = await pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=args,
            viewport=VIEWPORT,
            locale="en-GB",
            timezone_id="UTC",
        )
        try:
            context.set_default_timeout(TIMEOUT_MS)
            await context.add_init_script(RECORD_CSP)
            page = context.pages[0] if context.pages else await context.new_page()
            state = Browser(page, service, standin, chat_token)
            own = urlsplit(service.base_url).netloc

            async def only_the_service(route: Route) -> None:
                if urlsplit(route.request.url).netloc == own:
                    await route.continue_()
                else:
                    state.foreign_requests.append(route.request.url)
                    await route.abort()

            await context.route(re.compile(r"^https?://"), only_the_service)

            def on_console(message: ConsoleMessage) -> None:
                if message.type in ("error", "warning"):
                    state.console.append(f"{message.type}: {message.text}")

            page.on("console", on_console)
            page.on("pageerror", lambda error: state.page_errors.append(str(error)))
            await page.goto(f"{service.base_url}/")
            yield state
        finally:
            await context.close()


async def connect(browser: Browser, token: str) -> None:
    page = browser.page
    await page.fill("#token", token)
    await page.click("#token-form button[type=submit]")


def word_chunks(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


async def test_chat_streams_a_reply(browser: Browser, artifacts: Path) -> None:
    page = browser.page
    assert await page.title() == "DigitalMe"
    # Before connecting only the token form shows (the chat pane is hidden, not beside it).
    assert await page.is_visible("#connect") and await page.is_hidden("#chat")
    assert await page.is_hidden("#sign-out")
    await connect(browser, browser.chat_token)
    await page.wait_for_selector("#connect", state="hidden")
    assert await page.is_visible("#chat") and await page.is_visible("#sign-out")
    assert await page.text_content("#clone-name") == "Mara Lindqvist"
    assert await page.text_content("#avatar") == "ML"
    assert await page.text_content("#who") == "Signed in as web tester (chat)"
    assert await page.text_content("#messages .empty") is not None
    assert await page.locator("#conversations li").count() == 0

    chunks = word_chunks(ANSWER)
    assert len(chunks) >= 10
    browser.standin.script(Reply(chunks=chunks, chunk_delay=CHUNK_DELAY))
    await page.fill("#text", QUESTION)
    await page.press("#text", "Enter")

    # Streaming really streams: part of the answer shows while the reply is still coming
    # (read in one go in the page, so the stream cannot finish in between).
    reply = page.locator("li.message.assistant")
    during = await (
        await page.wait_for_function("""() => {
        const text = document.querySelector("li.message.assistant.streaming .text");
        return text && text.textContent.length > 0 && {
            text: text.textContent, status: document.getElementById("chat-status").textContent,
            sendDisabled: document.getElementById("send").disabled};
    }""")
    ).json_value()
    partial = during["text"]
    assert partial != ANSWER and ANSWER.startswith(partial), partial
    assert during["status"] == "typing…" and during["sendDisabled"] is True

    # Then it completes: whole text, a time stamp, no cursor.
    await page.wait_for_selector("li.message.assistant:not(.streaming) .meta")
    assert await reply.locator(".text").text_content() == ANSWER
    assert re.fullmatch(r"\d\d:\d\d", await reply.locator(".meta").text_content() or "")
    user = page.locator("li.message.user")
    assert await user.count() == 1 and await reply.count() == 1
    assert await user.locator(".text").text_content() == QUESTION
    assert await page.text_content("#chat-status") == "online"
    assert await page.is_enabled("#send")
    assert await page.input_value("#text") == ""
    assert await page.is_hidden("#chat-error")

    # The conversation shows in the sidebar, titled by the first message, selected.
    conversation = page.locator("#conversations li button")
    assert await conversation.count() == 1
    assert await conversation.text_content() == QUESTION[:60]
    assert "active" in (await conversation.get_attribute("class") or "")

    await page.screenshot(path=str(artifacts / "webchat.png"))

    # What the page showed is what was stored.
    request = browser.standin.message_requests[-1]
    assert request.stream and request.outcome == "streamed"
    headers = {"Authorization": f"Bearer {browser.chat_token}"}
    async with aiohttp.ClientSession(browser.service.base_url, headers=headers) as http:
        async with http.get("/api/v1/conversations") as response:
            [stored] = (await response.json())["conversations"]
        async with http.get(f"/api/v1/conversations/{stored['id']}/messages") as response:
            messages = (await response.json())["messages"]
    assert [(m["role"], m["text"]) for m in messages] == [("user", QUESTION), ("assistant", ANSWER)]

    # A reload keeps the token for this tab and shows the history again.
    await page.reload()
    await page.wait_for_selector("#chat", state="visible")
    await page.click("#conversations li button")
    await page.wait_for_selector("li.message.assistant")
    assert await page.locator("li.message .text").all_text_contents() == [QUESTION, ANSWER]

    await browser.assert_clean()


async def test_wrong_token_is_refused(browser: Browser, artifacts: Path) -> None:
    page = browser.page
    await connect(browser, "dm_" + "x" * 43)
    error = page.locator("#connect-error")
    await error.wait_for(state="visible")
    assert await error.text_content() == "That token is not valid."
    # Shown as an error (the danger colour), not as muted help text.
    assert await error.evaluate("e => getComputedStyle(e).color") == "rgb(255, 107, 129)"
    assert await page.is_hidden("#chat")
    assert await page.is_visible("#connect")
    assert await page.evaluate("sessionStorage.getItem('digitalme.token')") is None
    await page.screenshot(path=str(artifacts / "webchat-wrong-token.png"))
    # Chromium logs the refused request itself; nothing else may be logged.
    await browser.assert_clean(
        allowed_console=(
            "error: Failed to load resource: the server responded with a status of 401",
        )
    )
