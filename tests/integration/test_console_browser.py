"""The console in a real browser (docs/console.md): headless Chromium loads the page of a running
service (a subprocess on a real Redis) while traffic flows, and checks that the rule tree, the
traffic charts and the hot-keys table show what the traffic produced, that a hostile descriptor
value is shown as text and runs nothing, and that the dry-run form answers. It saves a screenshot
(``CONSOLE_SCREENSHOT=docs/img/console.png`` to refresh the one in the docs).

Skipped, saying so, where Chromium is not installed (``.ci/run`` installs Debian's package).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from support.cdp import Page, find_chromium, open_page
from support.redis_fixtures import RedisServer
from support.service_env import ServiceProcess, base_env, config_dir_env

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium; .ci/run installs it): "
    "the console's browser test did not run",
)

HOSTILE = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
SHOP = """
domain: shop
descriptors:
  - key: user
    rate_limit: {unit: day, requests_per_unit: 20}  # a day: no window ends during the test
  - key: path
    value: /checkout
    rate_limit: {unit: minute, requests_per_unit: 300}
    descriptors:
      - key: user
        rate_limit: {unit: minute, requests_per_unit: 8}
  - key: path
    value: /api/*
    shadow_mode: true
    rate_limit: {unit: second, requests_per_unit: 1}
  - key: client
    value: internal-*
    rate_limit: {unlimited: true}
"""
MESSAGING = """
domain: messaging
descriptors:
  - key: message_type
    value: marketing
    descriptors:
      - key: to_number
        rate_limit: {unit: hour, requests_per_unit: 4}
  - key: to_number
    rate_limit: {unit: day, requests_per_unit: 100, name: per_number}
"""


def body(domain: str, *descriptors: list[tuple[str, str]]) -> str:
    return json.dumps({
        "domain": domain,
        "descriptors": [{"entries": [{"key": k, "value": v} for k, v in d]} for d in descriptors],
    })  # fmt: skip


ROUND = [  # one round of traffic, sent every 0.2 s
    body("shop", [("user", "alice")]),
    body("shop", [("user", "bob")], [("client", "internal-batch")]),
    body("shop", [("user", HOSTILE)]),
    body("shop", [("path", "/checkout"), ("user", "carol")]),
    body("shop", [("path", "/api/v1/items")]),
    body("messaging", [("message_type", "marketing"), ("to_number", "+15550100")]),
]


async def send(http: aiohttp.ClientSession, port: int, payload: str) -> int:
    async with http.post(f"http://127.0.0.1:{port}/json", data=payload) as reply:
        return reply.status


async def traffic(port: int) -> None:
    async with aiohttp.ClientSession() as http:
        while True:
            await asyncio.gather(*(send(http, port, payload) for payload in ROUND))
            await asyncio.sleep(0.2)


@pytest.fixture
async def service(tmp_path: Path, redis_db: RedisServer) -> AsyncIterator[ServiceProcess]:
    runtime, config_dir = config_dir_env(tmp_path, None)
    (config_dir / "shop.yaml").write_text(SHOP)
    (config_dir / "messaging.yaml").write_text(MESSAGING)
    env = base_env(**runtime, BACKEND_TYPE="redis", REDIS_SOCKET_TYPE="tcp", REDIS_URL=redis_db.url)
    running = await ServiceProcess.start(env)
    try:
        yield running
    finally:
        await running.kill()


async def test_console_in_a_browser_shows_the_traffic_and_answers_a_dry_run(
    service: ServiceProcess, tmp_path: Path
) -> None:
    assert CHROMIUM is not None
    http_port, debug_port = service.ports["HTTP"], service.ports["debug"]
    async with aiohttp.ClientSession() as http:
        for _ in range(25):  # alice and the hostile user over their 20 a day at once
            await send(http, http_port, ROUND[0])
            await send(http, http_port, ROUND[2])
    flowing = asyncio.create_task(traffic(http_port))
    try:
        async with open_page(CHROMIUM, tmp_path / "profile") as page:
            await page.call("Page.navigate", url=f"http://127.0.0.1:{debug_port}/console")
            await check_tree(page)
            # A longer history for the picture in the docs (one sample every 2 s).
            await check_charts(page, samples=15 if os.environ.get("CONSOLE_SCREENSHOT") else 3)
            await check_hot_keys(page)
            await check_dry_run(page)
            screenshot = Path(os.environ.get("CONSOLE_SCREENSHOT") or tmp_path / "console.png")
            await page.screenshot(screenshot, width=1400)
    finally:
        flowing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flowing
    data = await asyncio.to_thread(screenshot.read_bytes)
    assert data.startswith(b"\x89PNG") and len(data) > 20_000


async def check_tree(page: Page) -> None:
    domains = await page.wait_for(
        "[...document.querySelectorAll('#rules-tree details.domain')].map(d => d.dataset.domain)"
        ".join(',') || null"
    )
    assert domains == "messaging,shop"
    text = await page.evaluate("document.getElementById('rules-tree').textContent")
    for shown in ("/checkout", "8 / minute (fixed_window)", "shadow", "unlimited", "name per_number"):
        assert shown in text, shown
    source = await page.evaluate("document.getElementById('rules-source').textContent")
    assert "2 files" in source and "1 loads, 0 failed" in source


async def check_charts(page: Page, samples: int) -> None:
    # Both domains drawn as lines of ``samples`` points, each with a point above the zero line:
    # the traffic reached the charts.
    await page.wait_for(
        """(() => {
          const charts = [...document.querySelectorAll('#traffic-charts .chart')];
          if (charts.map(c => c.dataset.domain).sort().join(',') !== 'messaging,shop') return false;
          return charts.every(chart => {
            const line = chart.querySelector('polyline[data-series=total_hits]');
            const axis = chart.querySelector('line');
            const zero = parseFloat(axis.getAttribute('y1'));
            const points = line ? line.getAttribute('points').split(' ') : [];
            return points.length >= SAMPLES && points.some(p => parseFloat(p.split(',')[1]) < zero - 1);
          });
        })()""".replace("SAMPLES", str(samples)),
        within=30 + 3 * samples,
    )
    over = await page.evaluate(
        "[...document.querySelectorAll('#traffic-charts .chart[data-domain=shop] "
        "polyline[data-series=over_limit]')].length"
    )
    assert over == 1
    rules = await page.wait_for(
        "[...document.querySelectorAll('#traffic-rules tbody tr[data-rule]')]"
        ".map(r => r.dataset.rule).sort().join('\\n') || null"
    )
    for rule in ("shop.user", "shop.path_/checkout.user", "shop.path_/api/*",
                 "messaging.message_type_marketing.to_number"):  # fmt: skip
        assert rule in rules.split("\n"), rules


async def check_hot_keys(page: Page) -> None:
    expected = [
        "shop: user=alice",
        f"shop: user={HOSTILE}",  # shown as the text it is
        "messaging: message_type=marketing, to_number=+15550100",  # over 4 an hour in a second
    ]
    rows = await page.wait_for(
        """(() => {
          const rows = [...document.querySelectorAll('#hot-keys tbody tr.over')]
            .map(r => [...r.cells].map(c => c.textContent));
          const shown = new Set(rows.map(r => r[0]));
          return EXPECTED.every(d => shown.has(d)) ? rows : null;
        })()""".replace("EXPECTED", json.dumps(expected))
    )
    alice = {row[0]: row for row in rows}["shop: user=alice"]
    assert alice[1] == "shop.user" and int(alice[2]) > 25 and alice[3] == "20"
    assert alice[4].endswith(" s") and 0 < int(alice[4][:-2]) <= 86400
    # The hostile value created no element and ran nothing.
    assert await page.evaluate("document.querySelectorAll('script').length") == 1
    assert await page.evaluate("document.querySelectorAll('img').length") == 0
    assert await page.evaluate("window.__pwned === undefined")


async def check_dry_run(page: Page) -> None:
    await page.evaluate(
        """(() => {
          document.getElementById('dry-domain').value = 'shop';
          document.getElementById('dry-descriptors').value =
            'user=alice\\npath=/checkout, user=dave\\nuser=' + HOSTILE;
          document.querySelector('#dry-run button').click();
        })()""".replace("HOSTILE", json.dumps(HOSTILE))
    )
    overall = await page.wait_for(
        "document.getElementById('dry-run-overall')?.textContent || null"
    )
    assert overall == "OVER_LIMIT"
    rows = await page.evaluate(
        "[...document.querySelectorAll('#dry-run-table tbody tr')]"
        ".map(r => [...r.cells].map(c => c.textContent))"
    )
    alice, dave, hostile = rows
    assert alice[0] == "user=alice" and alice[5] == "OVER_LIMIT" and alice[3] == "0"
    assert "path: user (key)" in alice[1] and int(alice[2]) > 25
    assert dave[5] == "OK" and dave[2] == "0" and dave[3] == "8"
    assert "path: path_/checkout (exact) → user (key)" in dave[1]
    assert hostile[0] == f"user={HOSTILE}" and hostile[5] == "OVER_LIMIT"
    assert await page.evaluate("window.__pwned === undefined")
