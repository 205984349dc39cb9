// Shared by the shop and the admin dashboard: calls to the JSON API, the
// server's clock, and formatting. No dependency, no build step.

/** Calls the API; resolves to { status, body, retryAfter } and never throws on an HTTP error. */
export async function call(method, path, { token, body, headers = {} } = {}) {
  const init = { method, headers: { ...headers } };
  if (token) init.headers.Authorization = `Bearer ${token}`;
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch {
    return { status: 0, body: { code: 'network', detail: 'the server cannot be reached' }, retryAfter: 2 };
  }
  let parsed = null;
  const text = await res.text();
  if (text) {
    try { parsed = JSON.parse(text); } catch { parsed = { detail: text }; }
  }
  const retryAfter = Number(res.headers.get('Retry-After')) || null;
  return { status: res.status, body: parsed, retryAfter };
}

/** The server's clock, learnt from the `server_time` of each answer or event. */
export const clock = {
  offsetMs: 0,
  learn(serverTime) {
    const t = Date.parse(serverTime);
    if (!Number.isNaN(t)) this.offsetMs = t - Date.now();
  },
  now() { return Date.now() + this.offsetMs; },
};

/** A fresh Idempotency-Key (works outside secure contexts too). */
export function newKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export function money(cents, currency) {
  try {
    return new Intl.NumberFormat(undefined, { style: 'currency', currency }).format(cents / 100);
  } catch {
    return `${(cents / 100).toFixed(2)} ${currency}`;
  }
}

/** "1:05", "2 h 03 min" and the like, for a span in milliseconds. */
export function span(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = s % 60;
  if (h > 0) return `${h} h ${String(m).padStart(2, '0')} min`;
  return `${m}:${String(sec).padStart(2, '0')}`;
}

/** Creates an element: el('button', { class: 'primary', onclick }, 'Buy'). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'class') node.className = v;
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null && c !== false) node.append(c instanceof Node ? c : String(c));
  }
  return node;
}

/** What a problem answer means to a person. */
export function explain(res) {
  const code = res.body && res.body.code;
  switch (code) {
    case 'sold_out': return 'Sold out.';
    case 'limit_reached': return 'You have reached the limit for this sale.';
    case 'not_started': return 'This sale has not started yet.';
    case 'ended': return 'This sale has ended.';
    case 'paused': return 'This sale is paused for now.';
    case 'unauthenticated': return 'Please sign in first.';
    case 'invalid_credentials': return 'That username and password do not match.';
    case 'username_taken': return 'That username is taken.';
    case 'rate_limited':
    case 'overloaded':
    case 'unavailable':
    case 'network':
      return `Busy, try again in ${res.retryAfter || 1} s.`;
    case 'reservation_expired': return 'The reservation has expired.';
    case 'order_cancelled': return 'This order was cancelled.';
    case 'order_paid': return 'This order is already paid.';
    case 'payment_declined': return 'The payment was declined.';
    default:
      return (res.body && (res.body.detail || res.body.title)) || `Something went wrong (${res.status}).`;
  }
}

/** Whether an answer says "try the same thing again shortly". */
export function retryable(res) {
  return res.status === 0 || res.status === 429 || res.status === 503;
}
