// The admin dashboard: every stock actor and the order pipeline live from
// GET /admin/v1/events (opened with a short-lived ticket, never the admin
// token in a URL), readiness, and creating, editing, pausing and resuming
// sales. The admin token lives in session storage only.
import { call, el, explain, money } from './api.js';

const TOKEN = 'flashsale.admin';
let token = sessionStorage.getItem(TOKEN);
let stream = null;
let last = null; // the previous status, for messages per second
const rates = new Map();

const $ = (id) => document.getElementById(id);

function say(text, good) {
  $('answer').textContent = text;
  $('answer').className = `answer ${good === undefined ? '' : good ? 'good' : 'bad'}`;
}

const asAdmin = (method, path, body) => call(method, path, { token, body });

// ---- sign-in ----------------------------------------------------------

$('signin').addEventListener('submit', async (e) => {
  e.preventDefault();
  token = $('admin-token').value;
  const res = await asAdmin('GET', '/admin/v1/sales');
  if (res.status !== 200) {
    token = null;
    return say(res.status === 401 ? 'That admin token is not right.' : explain(res), false);
  }
  sessionStorage.setItem(TOKEN, token);
  $('admin-token').value = '';
  say('Signed in.', true);
  start();
});

$('sign-out').addEventListener('click', () => {
  token = null;
  sessionStorage.removeItem(TOKEN);
  if (stream) stream.close();
  stream = null;
  $('dashboard').hidden = true;
  $('signin').hidden = false;
  $('account').hidden = true;
  say('Signed out.');
});

function start() {
  $('signin').hidden = true;
  $('account').hidden = false;
  $('dashboard').hidden = false;
  resetForm();
  connect();
  readiness();
}

// ---- the live stream --------------------------------------------------

async function connect() {
  if (!token) return;
  const res = await asAdmin('POST', '/admin/v1/events/tickets');
  if (res.status === 401) {
    say('The admin token was refused; sign in again.', false);
    return $('sign-out').click();
  }
  if (res.status !== 201) {
    $('live-state').textContent = 'reconnecting';
    return setTimeout(connect, 2000);
  }
  if (stream) stream.close();
  stream = new EventSource(`/admin/v1/events?ticket=${encodeURIComponent(res.body.ticket)}`);
  stream.addEventListener('open', () => {
    $('live-state').textContent = 'live';
    $('live-state').className = 'pill up';
  });
  stream.addEventListener('actors', (e) => show(JSON.parse(e.data)));
  // A ticket opens one stream: after a break, ask for a new one.
  stream.addEventListener('error', () => {
    $('live-state').textContent = 'reconnecting';
    $('live-state').className = 'pill down';
    stream.close();
    stream = null;
    setTimeout(connect, 2000);
  });
}

function show(status) {
  const seconds = last ? (Date.parse(status.server_time) - Date.parse(last.server_time)) / 1000 : 0;
  const before = new Map((last ? last.stock_actors : []).map((a) => [a.sale_id, a]));
  const body = $('actors').querySelector('tbody');
  body.replaceChildren();
  for (const a of status.stock_actors) {
    const prev = before.get(a.sale_id);
    if (prev && seconds > 0) rates.set(a.sale_id, (a.messages_handled - prev.messages_handled) / seconds);
    const meter = el('meter', { min: 0, max: Math.max(1, a.stock_total), value: a.stock_left, 'aria-label': `Stock left of ${a.name}` });
    const paused = a.status === 'paused';
    const ended = a.status === 'ended';
    const actions = el('td', { class: 'row' },
      el('button', { type: 'button', disabled: ended, onclick: () => pause(a, !paused) }, `${paused ? 'Resume' : 'Pause'} ${a.name}`),
      el('button', { type: 'button', disabled: ended, onclick: () => edit(a.sale_id) }, `Edit ${a.name}`));
    body.append(el('tr', { 'data-sale-id': a.sale_id },
      el('td', {}, a.name),
      el('td', { class: `status ${a.status}` }, a.status.replace('_', ' ')),
      el('td', {}, meter, ` ${a.stock_left} / ${a.stock_total}`),
      el('td', { class: 'num' }, a.reserved),
      el('td', { class: 'num' }, a.paid),
      el('td', { class: 'num' }, a.mailbox_depth),
      el('td', { class: 'num' }, (rates.get(a.sale_id) || 0).toFixed(1)),
      el('td', {}, a.running ? 'running' : 'stopped (ended)'),
      actions));
  }
  const p = status.pipeline;
  const services = p.storage === 'services';
  figures($('pipeline'), [
    ['Storage', services ? 'services (RabbitMQ, PostgreSQL)' : 'embedded (SQLite)'],
    ['Publisher', p.publisher.connected ? 'connected' : 'down'],
    ['Waiting to publish', p.publisher.queued],
    ['Unconfirmed batches', p.publisher.unconfirmed_batches],
    ['Batches confirmed', p.publisher.batches_confirmed],
    ['Orders confirmed', p.publisher.entries_confirmed],
    ['Last confirm', `${p.publisher.last_confirm_ms.toFixed(2)} ms`],
    ['In doubt', p.publisher.in_doubt],
    ['Queue depth', p.queue_depth],
    // The writers from RabbitMQ into PostgreSQL exist in services mode only.
    ...(services ? [
      ['Writers connected', `${p.writers.connected} of ${p.writers.pool_size}`],
      ['Rows written', p.writers.rows_written],
      ['Writes (statements)', p.writers.writes],
      ['Last write', `${p.writers.last_batch_ms.toFixed(2)} ms`],
    ] : []),
    ['Dead letters', p.writers.dead_letters],
    ['Retries', p.writers.retries],
    ['Orders kept in memory', p.directory_orders],
    ['Last error', p.publisher.last_error || p.writers.last_error || 'none'],
  ]);
  const breakers = Object.entries(p.breakers || {}).map(([name, b]) => [
    `Breaker ${name}`, `${String(b.state).replace('_', ' ')}, ${b.total_failures} failures${b.last_error ? `: ${b.last_error}` : ''}`]);
  figures($('health'), [...breakers, ['Readiness', readyText]]);
  last = status;
}

function figures(list, pairs) {
  list.replaceChildren(...pairs.map(([k, v]) => el('div', { class: 'figure' }, el('dt', {}, k), el('dd', {}, v))));
}

let readyText = 'checking';
async function readiness() {
  if (!token) return;
  const res = await asAdmin('GET', '/readyz');
  readyText = res.body ? `${res.body.status || res.status}` : `${res.status}`;
  if (res.body && res.body.checks) {
    const down = Object.entries(res.body.checks).filter(([, c]) => c !== 'ok').map(([n, c]) => `${n}: ${c}`);
    if (down.length) readyText += ` (${down.join(', ')})`;
  }
  setTimeout(readiness, 2000);
}

// ---- sale changes -----------------------------------------------------

async function pause(a, paused) {
  const res = await asAdmin('POST', `/admin/v1/sales/${a.sale_id}/${paused ? 'pause' : 'resume'}`);
  say(res.status === 200 ? `${a.name} is ${paused ? 'paused' : 'on sale again'}.` : explain(res), res.status === 200);
}

const pad = (n) => String(n).padStart(2, '0');
function localInput(date) {
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())}T${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function resetForm() {
  editing = null;
  $('sale-id').value = '';
  $('edit-title').textContent = 'Create a sale';
  $('save').textContent = 'Create sale';
  $('cancel-edit').hidden = true;
  const now = new Date();
  $('f-starts').value = localInput(new Date(now.getTime() + 60_000));
  $('f-ends').value = localInput(new Date(now.getTime() + 3_600_000));
}

let editing = null; // the sale as it was when editing began

async function edit(id) {
  const res = await asAdmin('GET', `/admin/v1/sales/${id}`);
  if (res.status !== 200) return say(explain(res), false);
  const s = res.body;
  editing = s;
  $('sale-id').value = s.id;
  $('f-name').value = s.name;
  $('f-description').value = s.description;
  $('f-price').value = s.price_cents;
  $('f-currency').value = s.currency;
  $('f-stock').value = s.stock_total;
  $('f-limit').value = s.per_user_limit;
  $('f-starts').value = localInput(new Date(s.starts_at));
  $('f-ends').value = localInput(new Date(s.ends_at));
  $('f-ttl').value = s.reservation_ttl_secs;
  $('edit-title').textContent = `Edit ${s.name}`;
  $('save').textContent = 'Save changes';
  $('cancel-edit').hidden = false;
  $('f-name').focus();
}

$('cancel-edit').addEventListener('click', resetForm);

$('sale-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const body = {
    name: $('f-name').value,
    description: $('f-description').value,
    price_cents: Number($('f-price').value),
    currency: $('f-currency').value,
    stock_total: Number($('f-stock').value),
    per_user_limit: Number($('f-limit').value),
    starts_at: new Date($('f-starts').value).toISOString(),
    ends_at: new Date($('f-ends').value).toISOString(),
    reservation_ttl_secs: Number($('f-ttl').value),
  };
  const id = $('sale-id').value;
  if (id && editing) {
    // Only what changed: a started sale refuses a new start, even the same
    // second written again.
    const sameSecond = (a, b) => Math.floor(Date.parse(a) / 1000) === Math.floor(Date.parse(b) / 1000);
    for (const k of Object.keys(body)) {
      const same = k.endsWith('_at') ? sameSecond(body[k], editing[k]) : body[k] === editing[k];
      if (same) delete body[k];
    }
  }
  const res = id
    ? await asAdmin('PATCH', `/admin/v1/sales/${id}`, body)
    : await asAdmin('POST', '/admin/v1/sales', body);
  if (res.status === 200 || res.status === 201) {
    say(`${res.body.name} ${id ? 'saved' : 'created'} (${money(res.body.price_cents, res.body.currency)}, ${res.body.stock_total} units).`, true);
    if (!id) $('f-name').value = '';
    resetForm();
  } else {
    const field = res.body && res.body.field ? ` (${res.body.field})` : '';
    say(`${explain(res)}${field}`, false);
  }
});

if (token) start();
