// The shop page and the admin dashboard in Debian's headless Chromium,
// driven by playwright-core (no browser download), against a server this
// test starts. Every control is found by its role and accessible name.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';
import { startServer, admin, ADMIN_TOKEN } from './server.mjs';

const shots = fileURLToPath(new URL('../../target/browser/', import.meta.url));
let server;
let browser;

before(async () => {
  mkdirSync(shots, { recursive: true });
  server = await startServer();
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (server) await server.stop();
});

/** Polls `read` until `ok` holds of its value; fails naming `what`. */
async function eventually(what, read, ok, ms = 15_000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await read();
    if (ok(last)) return last;
    if (Date.now() > deadline) assert.fail(`${what}: last seen ${JSON.stringify(last)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A page in a fresh context (its own session storage), with page errors collected. */
async function newPage(width = 1100) {
  const context = await browser.newContext({ viewport: { width, height: 900 } });
  const page = await context.newPage();
  page.errors = [];
  page.on('pageerror', (e) => page.errors.push(String(e)));
  // A refused request (a 409 the page explains) is logged by the browser
  // as a failed load: not an error of the page's.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) page.errors.push(m.text());
  });
  return page;
}

const card = (page, name) => page.locator('li.card', { hasText: name });
const stockText = (page, name) => card(page, name).locator('.stock').textContent();
const statusText = (page, name) => card(page, name).locator('.status').textContent();

test('a shopper signs up, waits out the countdown, buys, pays one order and cancels another', async () => {
  const name = 'Countdown sneakers';
  const now = Date.now();
  const created = await admin(server.base, 'POST', '/admin/v1/sales', {
    name, description: 'Five pairs', price_cents: 12900, currency: 'EUR', stock_total: 5, per_user_limit: 2,
    starts_at: new Date(now + 6_000).toISOString(), ends_at: new Date(now + 3_600_000).toISOString(),
  });
  assert.equal(created.status, 201);

  const shopper = await newPage(390); // a phone-width screen
  const watcher = await newPage();
  await shopper.goto(`${server.base}/`);
  await watcher.goto(`${server.base}/`);
  await eventually('the countdown', () => statusText(shopper, name), (t) => /^Starts in 0:0\d$/.test(t || ''));
  assert.equal(await stockText(watcher, name), '5 of 5 left');

  const username = `shopper${Date.now() % 1_000_000}`;
  await shopper.getByLabel('Username', { exact: true }).fill(username);
  await shopper.getByLabel('Password', { exact: true }).fill('correct horse battery');
  await shopper.getByRole('button', { name: 'Sign up' }).click();
  await eventually('signed in', () => shopper.locator('#whoami').textContent(), (t) => t === `Signed in as ${username}`);

  const buy = shopper.getByRole('button', { name: `Buy ${name}` });
  assert.equal(await buy.isDisabled(), true, 'no buying before the start');
  await eventually('the sale to open', () => buy.isEnabled(), (on) => on, 20_000);
  await buy.click();
  await eventually('the reservation', () => card(shopper, name).locator('.answer').textContent(), (t) => /^Reserved! Pay within \d+:\d\d/.test(t || ''));
  await eventually('the stock to fall on the other page', () => stockText(watcher, name), (t) => t === '4 of 5 left');
  await buy.click();
  await eventually('the second reservation', () => stockText(watcher, name), (t) => t === '3 of 5 left');
  await buy.click();
  await eventually('the limit', () => card(shopper, name).locator('.answer').textContent(), (t) => t === 'You have reached the limit for this sale.');

  const rows = shopper.locator('#orders tbody tr');
  await eventually('two orders listed', () => rows.count(), (n) => n === 2);
  await shopper.screenshot({ path: `${shots}shop-phone.png`, fullPage: true });
  await shopper.getByRole('button', { name: `Pay for ${name}` }).first().click();
  await eventually('one paid', () => shopper.locator('#orders .order-status').allTextContents(), (s) => s.includes('paid'));
  await shopper.getByRole('button', { name: `Cancel ${name}` }).click();
  await eventually('one cancelled', () => shopper.locator('#orders .order-status').allTextContents(),
    (s) => s.includes('paid') && s.includes('cancelled'));
  await eventually('the cancelled unit back on the other page', () => stockText(watcher, name), (t) => t === '4 of 5 left');
  await watcher.screenshot({ path: `${shots}shop.png`, fullPage: true });
  assert.deepEqual([...shopper.errors, ...watcher.errors], []);
  await shopper.context().close();
  await watcher.context().close();
});

test('an admin creates a sale and pauses it; the shop shows it paused without reloading', async () => {
  const name = 'Admin-made hoodies';
  const dashboard = await newPage(1280);
  const shop = await newPage();
  await shop.goto(`${server.base}/`);
  await dashboard.goto(`${server.base}/admin`);
  await dashboard.getByLabel('Admin token', { exact: true }).fill(ADMIN_TOKEN);
  await dashboard.getByRole('button', { name: 'Sign in' }).click();
  await eventually('the live stream', () => dashboard.locator('#live-state').textContent(), (t) => t === 'live');

  await dashboard.getByLabel('Name', { exact: true }).fill(name);
  await dashboard.getByLabel('Stock', { exact: true }).fill('10');
  const pad = (n) => String(n).padStart(2, '0');
  const d = new Date(Date.now() - 10_000);
  await dashboard.getByLabel('Starts (local time)', { exact: true }).fill(
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`);
  await dashboard.getByRole('button', { name: 'Create sale' }).click();
  await eventually('the answer', () => dashboard.locator('#answer').textContent(), (t) => (t || '').startsWith(`${name} created`));
  const row = dashboard.locator('#actors tbody tr', { hasText: name });
  await eventually('the new actor', () => row.count(), (n) => n === 1);
  await eventually('the sale in the shop', () => statusText(shop, name), (t) => (t || '').startsWith('On sale now'));

  await dashboard.getByRole('button', { name: `Pause ${name}` }).click();
  await eventually('paused in the shop', () => statusText(shop, name), (t) => t === 'Paused');
  await eventually('resume offered', () => dashboard.getByRole('button', { name: `Resume ${name}` }).count(), (n) => n === 1);
  await eventually('paused on the dashboard', () => row.locator('.status').textContent(), (t) => t === 'paused');
  // An edit sends only what changed (a started sale refuses a new start).
  await dashboard.getByRole('button', { name: `Edit ${name}` }).click();
  // The form fills itself from the sale once its GET answers: type after that.
  await eventually('the edit form', () => dashboard.locator('#edit-title').textContent(), (t) => t === `Edit ${name}`);
  await dashboard.getByLabel('Name', { exact: true }).fill(`${name} XL`);
  await dashboard.getByRole('button', { name: 'Save changes' }).click();
  await eventually('the edit saved', () => dashboard.locator('#answer').textContent(), (t) => (t || '').startsWith(`${name} XL saved`));
  await eventually('renamed in the shop', () => shop.locator('li.card h3').allTextContents(), (names) => names.includes(`${name} XL`));
  const figures = await dashboard.locator('#pipeline dt').allTextContents();
  assert.ok(figures.includes('Queue depth') && figures.includes('Dead letters'), figures.join(', '));
  await dashboard.screenshot({ path: `${shots}admin.png`, fullPage: true });
  assert.deepEqual([...dashboard.errors, ...shop.errors], []);
  await dashboard.context().close();
  await shop.context().close();
});
