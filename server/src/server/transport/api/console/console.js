// The waypost web console: views as #/ fragments over the JSON API under /v1/, read with the
// session cookie. Text only ever reaches the page as text (no innerHTML), and this file is the
// only script (the Content-Security-Policy allows no inline script).
//   #/                          apps
//   #/apps/APP                  its URLs, instances (live and gone) and config (secrets masked)
//   #/apps/APP/logs             the app's logs, followed live
//   #/apps/APP/instances/ID     one instance and its logs, followed live
'use strict';

// X-Waypost-Console: the server requires it on cookie-authenticated requests that change
// something (a cross-site form cannot send it); harmless on reads.
const HEADERS = { Accept: 'application/json', 'X-Waypost-Console': '1' };
const REFRESH_MS = 2000;
// Lines kept in a log view; older ones are dropped from the page.
const MAX_LINES = 5000;
const enc = encodeURIComponent;
const main = document.getElementById('main');

class SignedOut extends Error {}

// An element with attributes/listeners (`onclick`) and children (strings become text nodes).
function h(tag, props, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v == null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else if (k === 'checked') e.checked = !!v;
    else e.setAttribute(k, v === true ? '' : v);
  }
  for (const c of kids.flat(Infinity)) {
    if (c != null && c !== false) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

// Replaces `e`'s children (arrays flattened, as in `h`).
function fill(e, ...kids) {
  e.replaceChildren(...kids.flat(Infinity).filter((k) => k != null && k !== false)
    .map((k) => (k instanceof Node ? k : String(k))));
}

async function api(path) {
  const r = await fetch(path, { headers: HEADERS, cache: 'no-store' });
  if (r.status === 401) signedOut();
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

function signedOut() {
  location.assign('/console/sign-in');
  throw new SignedOut();
}

// ---- formatting ---------------------------------------------------------------------------

const SIGNALS = { 1: 'HUP', 2: 'INT', 3: 'QUIT', 4: 'ILL', 6: 'ABRT', 7: 'BUS', 8: 'FPE', 9: 'KILL',
  10: 'USR1', 11: 'SEGV', 12: 'USR2', 13: 'PIPE', 14: 'ALRM', 15: 'TERM' };
const dash = '–';

function bytes(n) {
  if (!n) return dash;
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${u[i]}`;
}

function cpu(ms) {
  if (ms == null) return dash;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} m ${Math.round(s % 60)} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} m`;
}

function ago(ts) {
  if (!ts) return dash;
  const s = Math.max(0, (Date.now() - Date.parse(ts)) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return ts.slice(0, 10);
}

function when(ts) {
  return h('span', { title: ts || '' }, ago(ts));
}

function pill(text) {
  return h('span', { class: `pill ${text}` }, text);
}

// How the child (or the instance) ended: exit code, signal, OOM kill.
function ending(i) {
  const parts = [];
  if (i.oom_killed) parts.push('OOM-killed');
  if (i.exit_signal != null) parts.push(`signal ${SIGNALS[i.exit_signal] || i.exit_signal}`);
  else if (i.exit_code != null) parts.push(`exit ${i.exit_code}`);
  if (!i.live && i.ended === 'lost') parts.push('connection lost');
  return parts.join(', ') || dash;
}

function state(i) {
  return i.live ? pill(i.child_state || 'connecting') : pill(i.ended || 'gone');
}

function labels(l) {
  const e = Object.entries(l || {});
  return e.length ? e.map(([k, v]) => h('span', { class: 'label' }, `${k}=${v}`)) : dash;
}

const short = (id) => id.slice(0, 12);

// ---- views --------------------------------------------------------------------------------

function crumbs(...parts) {
  const nav = document.getElementById('crumbs');
  fill(nav, ...parts.flatMap((p, i) => [i ? ' / ' : '', p]));
}

function banner(text) {
  const b = document.getElementById('banner');
  b.textContent = text || '';
  b.hidden = !text;
}

function intake(li) {
  banner(li && li.stalled
    ? `Log intake is stalled since ${li.since}: ${li.error}. New log lines are not stored.`
    : '');
}

// Runs `f` now and every REFRESH_MS while `root` is on the page.
function every(root, f) {
  const tick = async () => {
    if (!root.isConnected) return;
    try { await f(); } catch (e) { if (!(e instanceof SignedOut)) showError(root, e); }
    if (root.isConnected) setTimeout(tick, REFRESH_MS);
  };
  return tick();
}

function showError(root, e) {
  let p = root.querySelector(':scope > p.error');
  if (!p) { p = h('p', { class: 'error' }); root.prepend(p); }
  p.textContent = String(e.message || e);
}

async function appsView(root) {
  crumbs('apps');
  const table = h('table', { id: 'apps' });
  root.append(h('h2', {}, 'Apps'), table);
  await every(root, async () => {
    const [apps, inst] = await Promise.all([api('/v1/apps'), api('/v1/instances')]);
    intake(inst.log_intake);
    const live = {};
    for (const i of inst.instances) live[i.app] = (live[i.app] || 0) + 1;
    fill(table,
      h('tr', {}, h('th', {}, 'App'), h('th', { class: 'num' }, 'Live instances'), h('th', {}, 'Created')),
      apps.apps.length ? '' : h('tr', {}, h('td', { colspan: 3, class: 'muted' },
        'No apps yet: waypost app create NAME, or waypost up.')),
      apps.apps.map((a) => h('tr', {},
        h('td', {}, h('a', { href: `#/apps/${enc(a.name)}` }, a.name)),
        h('td', { class: 'num' }, live[a.name] || 0),
        h('td', {}, when(a.created_at)))),
    );
  });
}

function instanceRow(app, i) {
  return h('tr', { class: i.live ? 'live' : 'gone', 'data-instance': i.id },
    h('td', { class: 'mono' }, h('a', { href: `#/apps/${enc(app)}/instances/${i.id}`, title: i.id }, short(i.id))),
    h('td', {}, state(i)),
    h('td', { class: 'num mono', 'data-pid': i.child_pid ?? '' }, i.child_pid ?? dash),
    h('td', { class: 'num' }, bytes(i.child_rss_bytes)),
    h('td', { class: 'num' }, cpu(i.child_cpu_ms)),
    h('td', {}, ending(i)),
    h('td', { class: 'num' }, i.config_version || dash),
    h('td', { class: 'wrap' }, labels(i.labels)),
    h('td', {}, i.deployment || dash),
    h('td', {}, i.hostname),
    h('td', {}, when(i.live ? i.last_seen_at : i.disconnected_at)),
  );
}

const INSTANCE_HEAD = ['Instance', 'State', 'PID', 'RSS', 'CPU', 'Ended', 'Config', 'Labels',
  'Deployment', 'Host', 'Last seen'];

async function appView(root, app) {
  crumbs(h('a', { href: '#/' }, 'apps'), app);
  const urls = h('div', { class: 'card', id: 'urls' }, h('span', { class: 'muted' }, 'Loading…'));
  const showGone = h('input', { type: 'checkbox', id: 'show-gone', checked: true });
  const table = h('table', { id: 'instances' });
  const config = h('div', { id: 'config' });
  root.append(
    h('h2', {}, app, ' ', h('a', { href: `#/apps/${enc(app)}/logs`, class: 'muted' }, '· logs')),
    h('h3', {}, 'URL'), urls,
    h('h3', {}, 'Instances'),
    h('div', { class: 'toolbar' }, h('label', {}, showGone, ' show instances that are gone')),
    table,
    h('h3', {}, 'Config'), config,
  );
  const refresh = async () => {
    const inst = await api(`/v1/instances?app=${enc(app)}&all=${showGone.checked}`);
    intake(inst.log_intake);
    const rows = inst.instances.sort((a, b) => (b.live - a.live)
      || (b.connected_at || '').localeCompare(a.connected_at || ''));
    fill(table,
      h('tr', {}, INSTANCE_HEAD.map((t) => h('th', {}, t))),
      rows.length ? rows.map((i) => instanceRow(app, i))
        : h('tr', {}, h('td', { colspan: INSTANCE_HEAD.length, class: 'muted' }, 'No instances.')),
    );
  };
  showGone.addEventListener('change', () => refresh().catch((e) => showError(root, e)));
  loadUrls(urls, app).catch((e) => fill(urls, h('span', { class: 'error' }, e.message)));
  loadConfig(config, app).catch((e) => fill(config, h('p', { class: 'error' }, e.message)));
  await every(root, refresh);
}

async function loadUrls(box, app) {
  const [u, auth, dom] = await Promise.all([
    api(`/console/apps/${enc(app)}/urls`),
    api(`/v1/apps/${enc(app)}/url/auth`),
    api(`/v1/domains?app=${enc(app)}`),
  ]);
  const links = u.urls.concat(dom.domains.map((d) => d.url).filter(Boolean));
  const access = [];
  if (auth.open) access.push('open to anyone who can reach the ingress');
  if (auth.basic_users.length) access.push(`basic auth users: ${auth.basic_users.join(', ')}`);
  if (auth.bearer_tokens.length) access.push(`bearer tokens: ${auth.bearer_tokens.join(', ')}`);
  if (auth.allow_cidrs.length) access.push(`only from: ${auth.allow_cidrs.join(', ')}`);
  fill(box,
    h('dl', { class: 'kv' },
      h('dt', {}, 'URL'), h('dd', {}, links.map((l) => h('div', {},
        h('a', { href: l, target: '_blank', rel: 'noreferrer noopener', class: 'mono' }, l)))),
      dom.domains.length ? [h('dt', {}, 'Domains'),
        h('dd', {}, dom.domains.map((d) => `${d.domain} (certificate until ${d.not_after.slice(0, 10)})`).join(', '))] : '',
      h('dt', {}, 'Access'), h('dd', {}, access.join('; '))),
  );
}

async function loadConfig(box, app) {
  const c = await api(`/v1/apps/${enc(app)}/config`);
  const entries = c.entries.filter((e) => !e.internal);
  const target = (e) => e.deployment ? `deployment ${e.deployment}` : e.where ? e.where : 'all';
  fill(box,
    h('div', { class: 'card' }, h('dl', { class: 'kv' },
      h('dt', {}, 'Version'), h('dd', {}, c.version),
      h('dt', {}, 'On change'), h('dd', {}, c.policy.on_change),
      h('dt', {}, 'Stop grace'), h('dd', {}, `${c.policy.stop_grace_ms / 1000} s`))),
    h('table', { id: 'config-vars' },
      h('tr', {}, ['Variable', 'Value', 'Scope', 'For', ''].map((t) => h('th', {}, t))),
      entries.length ? entries.map((e) => h('tr', {},
        h('td', { class: 'mono' }, e.key),
        h('td', { class: 'mono wrap' }, e.value ?? (e.dynamic ? `from ${e.dynamic}` : dash),
          e.error ? h('div', { class: 'error' }, e.error) : ''),
        h('td', {}, e.scope), h('td', {}, target(e)),
        h('td', {}, e.secret ? pill('secret') : '', e.status ? [' ', pill(e.status)] : '')))
        : h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'No variables.'))),
    c.files.length ? h('table', { id: 'config-files' },
      h('tr', {}, ['File', 'Mode', 'Size', 'Scope', ''].map((t) => h('th', {}, t))),
      c.files.map((f) => h('tr', {},
        h('td', { class: 'mono' }, f.path), h('td', { class: 'mono' }, f.mode),
        h('td', { class: 'num' }, f.size != null ? bytes(f.size) : `from ${f.dynamic}`),
        h('td', {}, f.scope), h('td', {}, f.secret ? pill('secret') : '')))) : '',
  );
}

async function instanceView(root, app, id) {
  crumbs(h('a', { href: '#/' }, 'apps'), h('a', { href: `#/apps/${enc(app)}` }, app), short(id));
  const details = h('div', { class: 'card', id: 'instance' });
  root.append(h('h2', {}, 'Instance ', h('span', { class: 'mono' }, id)), details);
  const logs = logViewer(app, id);
  root.append(h('h3', {}, 'Logs'), logs.el);
  root.addEventListener('leave', logs.stop);
  await every(root, async () => {
    const inst = await api(`/v1/instances?app=${enc(app)}&all=true`);
    const i = inst.instances.find((x) => x.id.startsWith(id));
    if (!i) { details.textContent = 'No such instance.'; return; }
    const kv = [
      ['State', state(i)], ['Child PID', h('span', { class: 'mono', 'data-pid': i.child_pid ?? '' }, i.child_pid ?? dash)],
      ['RSS', bytes(i.child_rss_bytes)], ['CPU', cpu(i.child_cpu_ms)], ['Ended', ending(i)],
      ['Starts', i.starts], ['Config version', i.config_version || dash], ['Labels', labels(i.labels)],
      ['Deployment', i.deployment || dash], ['Host', `${i.hostname} (entrypoint pid ${i.entrypoint_pid}, ${i.entrypoint_version}, ${bytes(i.entrypoint_rss_bytes)})`],
      ['Connected', when(i.connected_at)], ['Last seen', when(i.last_seen_at)],
    ];
    if (i.disconnected_at) kv.push(['Disconnected', when(i.disconnected_at)]);
    if (i.replica) kv.push(['Replica', i.replica]);
    fill(details, h('dl', { class: 'kv cols' }, kv.map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)])));
  });
}

async function appLogsView(root, app) {
  crumbs(h('a', { href: '#/' }, 'apps'), h('a', { href: `#/apps/${enc(app)}` }, app), 'logs');
  const logs = logViewer(app, null);
  root.append(h('h2', {}, `Logs of ${app}`), logs.el);
  root.addEventListener('leave', logs.stop);
}

// A log box reading GET /v1/apps/APP/logs as NDJSON through a ReadableStream; with "follow" the
// response stays open and new lines arrive as they are stored. A dropped stream is resumed from
// the last line seen (`since`, duplicates skipped by row id).
function logViewer(app, instance) {
  const follow = h('input', { type: 'checkbox', id: 'follow', checked: true });
  const status = h('span', { class: 'muted', id: 'log-status' });
  const box = h('div', { id: 'log', role: 'log' });
  const el = h('div', {}, h('div', { class: 'toolbar' }, h('label', {}, follow, ' follow'), status), box);
  let ctrl = null;
  let lastId = -1;
  let lastTs = null;
  let retry = null;

  const stop = () => {
    clearTimeout(retry);
    if (ctrl) ctrl.abort();
    ctrl = null;
  };

  const add = (rows) => {
    const atBottom = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
    const frag = document.createDocumentFragment();
    for (const o of rows) {
      if (o.log_intake) { intake(o.log_intake); continue; }
      if (o.error) { status.textContent = o.error; continue; }
      if (o.id == null || o.id <= lastId) continue;
      lastId = o.id;
      lastTs = o.ts;
      frag.append(h('div', { class: o.dropped ? 'marker' : o.stream },
        h('span', { class: 'ts', title: o.ts }, o.ts.slice(11, 23)),
        instance ? '' : h('span', { class: 'inst' }, o.instance.slice(0, 8)),
        o.dropped ? `… ${o.dropped} lines lost` : o.text));
    }
    box.append(frag);
    while (box.childElementCount > MAX_LINES) box.firstChild.remove();
    if (atBottom) box.scrollTop = box.scrollHeight;
  };

  const start = async () => {
    stop();
    const me = (ctrl = new AbortController());
    const q = new URLSearchParams();
    if (instance) q.set('instance', instance);
    if (lastTs) q.set('since', lastTs);
    else q.set('tail', '500');
    if (follow.checked) q.set('follow', 'true');
    status.textContent = follow.checked ? 'following' : 'loading…';
    try {
      const r = await fetch(`/v1/apps/${enc(app)}/logs?${q}`, { headers: HEADERS, signal: me.signal });
      if (r.status === 401) signedOut();
      if (!r.ok) {
        const b = await r.json().catch(() => ({}));
        throw new Error(b.error || `${r.status} ${r.statusText}`);
      }
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        const lines = buf.split('\n');
        buf = lines.pop();
        add(lines.filter((l) => l.trim()).map((l) => JSON.parse(l)));
      }
      if (!follow.checked) { status.textContent = `${box.childElementCount} lines`; return; }
      status.textContent = 'the stream ended; reconnecting…';
    } catch (e) {
      if (e.name === 'AbortError' || e instanceof SignedOut) return;
      status.textContent = `${e.message}; retrying…`;
    }
    if (follow.checked && box.isConnected && ctrl === me) retry = setTimeout(start, REFRESH_MS);
  };

  follow.addEventListener('change', () => {
    if (follow.checked) { start(); return; }
    stop();
    status.textContent = 'paused';
  });
  start();
  return { el, stop };
}

// ---- routing ------------------------------------------------------------------------------

let current = null;

function route() {
  if (current) current.dispatchEvent(new Event('leave'));
  const root = (current = h('div'));
  fill(main, root);
  banner('');
  const p = location.hash.replace(/^#\/?/, '').split('/').filter(Boolean).map(decodeURIComponent);
  let view;
  if (p[0] === 'apps' && p[1] && p[2] === 'logs') view = appLogsView(root, p[1]);
  else if (p[0] === 'apps' && p[1] && p[2] === 'instances' && p[3]) view = instanceView(root, p[1], p[3]);
  else if (p[0] === 'apps' && p[1]) view = appView(root, p[1]);
  else view = appsView(root);
  view.catch((e) => { if (!(e instanceof SignedOut)) showError(root, e); });
}

window.addEventListener('hashchange', route);
api('/v1/server').then((s) => {
  document.getElementById('server').textContent = `server ${s.version} · ${s.live_instances} live`;
}).catch(() => {});
route();
