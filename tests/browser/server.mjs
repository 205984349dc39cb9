// Starts the flashsale binary for a browser test with its defaults (embedded
// mode), its SQLite file in a directory of its own, on a free port of
// 127.0.0.1; and removes the directory after.
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = fileURLToPath(new URL('../..', import.meta.url));
export const ADMIN_TOKEN = 'browser-test-admin-token-of-32-bytes!';

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

export async function startServer() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), 'flashsale_browser_'));
  const env = {
    ...process.env,
    FLASHSALE__SERVER__HOST: '127.0.0.1',
    FLASHSALE__SERVER__PORT: String(port),
    FLASHSALE__SERVER__WORKERS: '2',
    FLASHSALE__STORAGE__PATH: join(dir, 'flashsale.db'),
    FLASHSALE__AUTH__ADMIN_TOKEN: ADMIN_TOKEN,
    FLASHSALE__AUTH__ARGON2_MEMORY_KIB: '256',
    FLASHSALE__AUTH__ARGON2_ITERATIONS: '1',
    FLASHSALE__LIMITS__PER_IP_PER_SECOND: '0',
    FLASHSALE__LIMITS__LOGINS_PER_IP_PER_MINUTE: '0',
    FLASHSALE__TELEMETRY__LOG_FILTER: 'warn',
  };
  delete env.RUST_LOG;
  delete env.FLASHSALE__STORAGE__MODE;
  const bin = process.env.FLASHSALE_BIN || `${root}target/debug/flashsale`;
  const child = spawn(bin, [], { cwd: root, env, stdio: ['ignore', 'inherit', 'inherit'] });
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 60_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`the server exited with ${child.exitCode}`);
    try {
      const res = await fetch(`${base}/readyz`);
      if (res.status === 200) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) throw new Error('the server did not become ready within 60 s');
    await new Promise((r) => setTimeout(r, 200));
  }
  return {
    base,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        await Promise.race([exited, new Promise((r) => setTimeout(r, 20_000))]);
        if (child.exitCode === null) child.kill('SIGKILL');
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** An admin API call from the test itself. */
export async function admin(base, method, path, body) {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: { Authorization: `Bearer ${ADMIN_TOKEN}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: res.status, body: await res.json().catch(() => null) };
}
