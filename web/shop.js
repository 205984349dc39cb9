// The shop page: every sale live from GET /api/v1/sales/events, a countdown
// from the server's clock, sign-up and sign-in, buying with an
// Idempotency-Key per press, and the buyer's orders with pay and cancel.
import { call, clock, newKey, money, span, el, explain, retryable } from './api.js';

const TOKEN = 'flashsale.shopper';
const sales = new Map(); // id -> sale view (as the stream sent it)
const cards = new Map(); // id -> { root, parts }
let orders = [];
let session = JSON.parse(sessionStorage.getItem(TOKEN) || 'null');

const $ = (id) => document.getElementById(id);

function say(node, text, good) {
  node.textContent = text;
  node.className = `answer ${good === undefined ? '' : good ? 'good' : 'bad'}`;
}

// ---- account ----------------------------------------------------------

function showSession() {
  $('signin').hidden = !!session;
  $('account').hidden = !session;
  $('orders-section').hidden = !session;
  $('whoami').textContent = session ? `Signed in as ${session.username}` : '';
  for (const id of sales.keys()) render(id);
  if (session) loadOrders();
}

async function signIn(username, password) {
  const res = await call('POST', '/api/v1/sessions', { body: { username, password } });
  if (res.status !== 200) return say($('account-answer'), explain(res), false);
  session = { username, token: res.body.token };
  sessionStorage.setItem(TOKEN, JSON.stringify(session));
  say($('account-answer'), `Welcome, ${username}.`, true);
  showSession();
}

$('signin').addEventListener('submit', (e) => {
  e.preventDefault();
  signIn($('username').value.trim(), $('password').value);
});

$('sign-up').addEventListener('click', async () => {
  const form = $('signin');
  if (!form.reportValidity()) return;
  const username = $('username').value.trim();
  const password = $('password').value;
  const res = await call('POST', '/api/v1/users', { body: { username, password } });
  if (res.status !== 201) return say($('account-answer'), explain(res), false);
  await signIn(username, password);
});

$('sign-out').addEventListener('click', () => {
  session = null;
  sessionStorage.removeItem(TOKEN);
  orders = [];
  renderOrders();
  say($('account-answer'), 'Signed out.');
  showSession();
});

/** A call as the shopper; a stale token signs out. */
async function asShopper(method, path, opts = {}) {
  const res = await call(method, path, { ...opts, token: session && session.token });
  if (res.status === 401 && session) {
    session = null;
    sessionStorage.removeItem(TOKEN);
    showSession();
  }
  return res;
}

// ---- sales ------------------------------------------------------------

const STATUS_WORDS = {
  live: 'On sale now', scheduled: 'Starts soon', sold_out: 'Sold out', paused: 'Paused', ended: 'Ended',
};

/** The status as of now on the server's clock (the start and end pass without an event). */
function statusNow(s) {
  const now = clock.now();
  if (s.status === 'scheduled' && now >= Date.parse(s.starts_at)) return s.stock_left > 0 ? 'live' : 'sold_out';
  if ((s.status === 'live' || s.status === 'sold_out') && now >= Date.parse(s.ends_at)) return 'ended';
  return s.status;
}

function card(id) {
  if (cards.has(id)) return cards.get(id);
  const parts = {
    name: el('h3'),
    description: el('p'),
    price: el('div', { class: 'price' }),
    meter: el('meter', { min: 0, max: 1, value: 0 }),
    stock: el('div', { class: 'stock' }),
    status: el('div', { class: 'status' }),
    buy: el('button', { class: 'primary', type: 'button' }),
    retry: el('button', { type: 'button', hidden: true }),
    answer: el('p', { class: 'answer', role: 'status', 'aria-live': 'polite' }),
  };
  parts.buy.addEventListener('click', () => buy(id, newKey()));
  const root = el('li', { class: 'card', 'data-sale-id': id },
    parts.name, parts.description, parts.price, parts.meter, parts.stock, parts.status,
    el('div', { class: 'row' }, parts.buy, parts.retry), parts.answer);
  $('sales').append(root);
  const entry = { root, parts, retryKey: null };
  cards.set(id, entry);
  return entry;
}

function render(id) {
  const s = sales.get(id);
  if (!s) return;
  const { parts } = card(id);
  const status = statusNow(s);
  parts.name.textContent = s.name;
  parts.description.textContent = s.description;
  parts.description.hidden = !s.description;
  parts.price.textContent = money(s.price_cents, s.currency);
  parts.meter.max = Math.max(1, s.stock_total);
  parts.meter.value = s.stock_left;
  parts.meter.setAttribute('aria-label', `Stock left of ${s.name}`);
  parts.stock.textContent = `${s.stock_left} of ${s.stock_total} left`;
  let words = STATUS_WORDS[status] || status;
  if (status === 'scheduled') words = `Starts in ${span(Date.parse(s.starts_at) - clock.now())}`;
  if (status === 'live') words = `On sale now, ends in ${span(Date.parse(s.ends_at) - clock.now())}`;
  parts.status.textContent = words;
  parts.status.className = `status ${status}`;
  parts.buy.textContent = `Buy ${s.name}`;
  parts.buy.disabled = status !== 'live' || !session;
  parts.buy.title = session ? '' : 'Sign in to buy';
  $('sales-empty').hidden = sales.size > 0;
}

function listen() {
  const stream = new EventSource('/api/v1/sales/events');
  stream.addEventListener('sale', (e) => {
    const s = JSON.parse(e.data);
    clock.learn(s.server_time);
    sales.set(s.id, s);
    render(s.id);
  });
}

// The countdown and the time left to pay move every second without events.
setInterval(() => {
  for (const id of sales.keys()) render(id);
  renderOrderTimes();
}, 250);

// ---- buying -----------------------------------------------------------

async function buy(id, key) {
  const entry = card(id);
  const s = sales.get(id);
  entry.parts.buy.disabled = true;
  entry.parts.retry.hidden = true;
  say(entry.parts.answer, 'Reserving…');
  const res = await asShopper('POST', `/api/v1/sales/${id}/purchases`, {
    body: { quantity: 1 },
    headers: { 'Idempotency-Key': key },
  });
  if (res.status === 201 || res.status === 200) {
    const left = Date.parse(res.body.expires_at) - clock.now();
    say(entry.parts.answer, `Reserved! Pay within ${span(left)} to keep it.`, true);
    loadOrders();
  } else if (retryable(res)) {
    // The same press, tried again, keeps its key: it can never buy twice.
    say(entry.parts.answer, explain(res), false);
    entry.parts.retry.textContent = `Try again to buy ${s ? s.name : 'it'}`;
    entry.parts.retry.hidden = false;
    entry.parts.retry.onclick = () => buy(id, key);
  } else {
    say(entry.parts.answer, explain(res), false);
  }
  render(id);
}

// ---- orders -----------------------------------------------------------

async function loadOrders() {
  if (!session) return;
  const res = await asShopper('GET', '/api/v1/orders');
  if (res.status === 200) {
    orders = res.body.orders;
    renderOrders();
  }
}

function saleName(order) {
  const s = sales.get(order.sale_id);
  return s ? s.name : order.sale_id.slice(0, 8);
}

function renderOrders() {
  const body = $('orders').querySelector('tbody');
  body.replaceChildren();
  for (const o of orders) {
    const name = saleName(o);
    const actions = el('td');
    if (o.status === 'reserved') {
      actions.append(
        el('button', { type: 'button', class: 'primary', 'aria-label': `Pay for ${name}`, onclick: () => act(o, 'payment') }, 'Pay'), ' ',
        el('button', { type: 'button', 'aria-label': `Cancel ${name}`, onclick: () => act(o, 'cancel') }, 'Cancel'),
      );
    }
    actions.setAttribute('data-label', 'Actions');
    body.append(el('tr', { 'data-order-id': o.id },
      el('td', { 'data-label': 'Sale' }, name), el('td', { class: 'num', 'data-label': 'Units' }, o.quantity),
      el('td', { class: 'order-status', 'data-label': 'Status' }, o.status),
      el('td', { class: 'time-left', 'data-label': 'Time left to pay', 'data-expires': o.status === 'reserved' ? o.expires_at : '' }),
      actions));
  }
  $('orders').hidden = orders.length === 0;
  $('orders-empty').hidden = orders.length > 0;
  renderOrderTimes();
}

function renderOrderTimes() {
  for (const cell of document.querySelectorAll('#orders .time-left')) {
    const at = cell.getAttribute('data-expires');
    cell.textContent = at ? span(Date.parse(at) - clock.now()) : '';
  }
}

async function act(order, action) {
  const res = await asShopper('POST', `/api/v1/orders/${order.id}/${action}`);
  const done = res.status === 200 || res.status === 202;
  const words = action === 'payment'
    ? (res.status === 202 ? 'Payment pending with the provider.' : 'Paid. Thank you!')
    : 'Cancelled; the unit is back on sale.';
  say($('account-answer'), done ? words : explain(res), done);
  loadOrders();
}

showSession();
listen();
