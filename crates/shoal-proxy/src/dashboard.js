// shoal's live dashboard: an EventSource on /api/dashboard/stream (the browser reconnects on
// its own), 15 minutes of per-second points drawn on small canvas charts. Read-only.
"use strict";
const SPAN = 900;
const C = {blue:"#3b7dd8", green:"#1a8f3a", orange:"#dd7a1f", red:"#d64045", purple:"#7b5cc4",
           gray:"#8a94a3", teal:"#159a9c", amber:"#c9a21a"};
let points = [], instances = {}, decisions = {}, span = SPAN;

const fmt = {
  n(v){ if(v==null||!isFinite(v))return "–"; const a=Math.abs(v);
        return a>=1e6?(v/1e6).toFixed(1)+"M":a>=1e3?(v/1e3).toFixed(1)+"k":a>=100?v.toFixed(0):a>=10?v.toFixed(1):v.toFixed(2); },
  ms(v){ return v==null?"–":(v*1e3>=100?(v*1e3).toFixed(0):(v*1e3).toFixed(1))+" ms"; },
  pct(v){ return v==null?"–":(v*100).toFixed(v<0.1?2:1)+"%"; },
  bytes(v){ if(v==null)return "–"; const u=["B","KiB","MiB","GiB"]; let i=0; while(v>=1024&&i<3){v/=1024;i++} return v.toFixed(v>=100?0:1)+" "+u[i]; },
  int(v){ return v==null?"–":String(Math.round(v)); },
};

function esc(s){ return String(s).replace(/[&<>"]/g, c=>({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c])); }

// Draws series [{label,color,ys,dash,step}] over xs (unix seconds) on a canvas; returns the
// number of points with a value.
function chart(canvas, xs, series, f, opts){
  opts = opts||{};
  const dpr = window.devicePixelRatio||1, w = canvas.clientWidth||340, h = canvas.clientHeight||150;
  canvas.width = w*dpr; canvas.height = h*dpr;
  const g = canvas.getContext("2d"); g.setTransform(dpr,0,0,dpr,0,0); g.clearRect(0,0,w,h);
  const L = 56, R = 6, T = 6, B = 18, pw = w-L-R, ph = h-T-B;
  const t1 = xs.length ? xs[xs.length-1] : Date.now()/1000, t0 = t1 - span;
  let lo = opts.min0===false ? Infinity : 0, hi = -Infinity, n = 0;
  for(const s of series) for(const y of s.ys) if(y!=null&&isFinite(y)){ lo=Math.min(lo,y); hi=Math.max(hi,y); n++; }
  if(opts.max!=null) hi = Math.max(hi, opts.max);
  if(!isFinite(hi)){ hi = 1; lo = 0; }
  if(hi===lo) hi = lo + (lo===0 ? 1 : Math.abs(lo)*0.1);
  // Round ticks: a step of 1, 2, 2.5 or 5 × 10^k, the top on a step.
  const raw = (hi-lo)/3, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1,2,2.5,5,10].map(m=>m*mag).find(s=>s>=raw) || raw;
  lo = Math.floor(lo/step)*step; hi = Math.max(lo+step, Math.ceil(hi*1.0001/step)*step);
  const ticks = Math.round((hi-lo)/step);
  const X = t => L + (t-t0)/span*pw, Y = v => T + ph - (v-lo)/(hi-lo)*ph;
  g.font = "10px system-ui,sans-serif"; g.fillStyle = "#8a94a3"; g.strokeStyle = "#edf0f3"; g.lineWidth = 1;
  for(let i=0;i<=ticks;i++){ const v = lo + step*i, y = Math.round(Y(v))+.5;
    g.beginPath(); g.moveTo(L,y); g.lineTo(L+pw,y); g.stroke();
    g.textAlign="right"; g.fillText(f(v), L-4, y+3); }
  g.textAlign = "center";
  for(let m=5; m<=15; m+=5){ const t = t1 - (15-m)*60, x = X(t);
    g.fillText(m===15 ? "now" : "-"+(15-m)+"m", Math.min(x, L+pw-12), h-4); }
  g.fillText("-15m", L+10, h-4);
  for(const s of series){
    g.strokeStyle = s.color; g.lineWidth = s.width||1.5; g.setLineDash(s.dash?[4,3]:[]);
    g.beginPath(); let pen = false, py = 0;
    for(let i=0;i<xs.length;i++){ const y = s.ys[i];
      if(y==null||!isFinite(y)||xs[i]<t0){ pen=false; continue; }
      const x = X(xs[i]), yy = Y(y);
      if(!pen){ g.moveTo(x,yy); pen=true; } else { if(s.step) g.lineTo(x,py); g.lineTo(x,yy); }
      py = yy; }
    g.stroke();
  }
  g.setLineDash([]);
  canvas.dataset.points = n;
  return n;
}

function legend(series, f){
  return series.map(s=>{ let v=null; for(let i=s.ys.length-1;i>=0;i--) if(s.ys[i]!=null){v=s.ys[i];break}
    return `<span><i style="background:${s.color}"></i>${esc(s.label)} <b>${f(v)}</b></span>`; }).join("");
}

// The charts of one service, as [id, title, series, formatter, opts, empty message].
function panels(name){
  const P = points.map(p=>p.services[name]||{});
  const col = k => P.map(s=>s[k]==null?null:s[k]);
  const code = c => P.map(s=>s.codes?(s.codes[c]||0):null);
  const out = [];
  const req = [{label:"req/s", color:C.blue, ys:col("rps"), width:2}];
  if(P.some(s=>s.forecast!=null)){
    req.push({label:"demand", color:C.teal, ys:col("demand")});
    req.push({label:"forecast", color:C.purple, ys:col("forecast"), dash:true});
  }
  out.push(["req", "Requests / s", req, fmt.n]);
  out.push(["err", "Errors / s by class", [
    {label:"4xx", color:C.amber, ys:code("4xx")}, {label:"5xx", color:C.red, ys:code("5xx"), width:2}], fmt.n]);
  out.push(["lat", "Latency (10 s window)", [
    {label:"p50", color:C.green, ys:col("p50")}, {label:"p95", color:C.orange, ys:col("p95")},
    {label:"p99", color:C.red, ys:col("p99"), width:2}], fmt.ms]);
  const inst = [{label:"ready", color:C.green, ys:col("ready"), step:true, width:2},
    {label:"starting", color:C.orange, ys:col("starting"), step:true},
    {label:"draining", color:C.blue, ys:col("draining"), step:true}];
  if(P.some(s=>s.desired!=null)) inst.push({label:"desired", color:C.purple, ys:col("desired"), step:true, dash:true});
  if(P.some(s=>s.max!=null)) inst.push({label:"max", color:C.gray, ys:col("max"), step:true, dash:true, width:1});
  out.push(["inst", "Instances by state vs desired", inst, fmt.int]);
  const cpu = [{label:"mean", color:C.blue, ys:col("cpu_mean"), width:2}, {label:"max", color:C.orange, ys:col("cpu_max")}];
  if(P.some(s=>s.cpu_limit!=null)) cpu.push({label:"limit", color:C.red, ys:col("cpu_limit"), dash:true, width:1});
  out.push(["cpu", "CPU per instance (cores)", cpu, fmt.n, {},
    "no CPU figures (instances not run by shoal)"]);
  const mem = [{label:"max", color:C.purple, ys:col("mem_max"), width:2}];
  if(P.some(s=>s.mem_limit!=null)) mem.push({label:"limit", color:C.red, ys:col("mem_limit"), dash:true, width:1});
  out.push(["mem", "Memory per instance", mem, fmt.bytes, {}, "no memory figures (instances not run by shoal)"]);
  out.push(["cache", "Cache hit ratio", [{label:"hit ratio", color:C.teal, ys:col("cache_hit_ratio"), width:2}],
    fmt.pct, {max:1}, "no cache on this service"]);
  return out;
}

function last(name, k){ for(let i=points.length-1;i>=0;i--){ const s=points[i].services[name]; if(s&&s[k]!=null) return s[k]; } return null; }

function kpis(name){
  const rps = last(name,"rps"), c = (points.length?points[points.length-1].services[name]:null)||{};
  const e5 = c.codes&&rps>0 ? (c.codes["5xx"]||0)/rps : null;
  return `<span class="kpi"><b>${fmt.n(rps)}</b> req/s</span>` +
    `<span class="kpi"><b>${fmt.pct(e5)}</b> 5xx</span>` +
    `<span class="kpi">p99 <b>${fmt.ms(last(name,"p99"))}</b></span>` +
    `<span class="kpi"><b>${fmt.int(c.ready)}</b> ready` + (c.desired!=null?` / <b>${fmt.int(c.desired)}</b> desired`:"") +
    (c.max!=null?` (max ${fmt.int(c.max)})`:"") + `</span>`;
}

function instanceTable(name){
  const rows = (instances[name]||[]).slice();
  const lim = last(name,"cpu_limit"), mlim = last(name,"mem_limit");
  rows.sort((a,b)=>(b.cpu||0)-(a.cpu||0) || (b.rps-a.rps));
  const shown = rows.slice(0, 200);
  const cpuMax = lim || Math.max(0.01, ...rows.map(r=>r.cpu||0));
  const memMax = mlim || Math.max(1, ...rows.map(r=>r.mem||0));
  const bar = (v, max) => { const f = v==null?0:Math.min(1, v/max);
    return `<span class="track"><span class="bar${f>0.9?" hot":""}" style="width:${(f*100).toFixed(0)}%"></span></span>`; };
  let h = `<table><tr><th>instance</th><th>state</th><th class="n">req/s</th><th class="n">in flight</th><th>CPU${lim?" / "+fmt.n(lim):""}</th><th>memory${mlim?" / "+fmt.bytes(mlim):""}</th></tr>`;
  for(const r of shown){
    h += `<tr><td>${esc(r.id)}</td><td class="${r.healthy?esc(r.state):"bad"}">${esc(r.state)}${r.healthy?"":" (unhealthy)"}</td>` +
      `<td class="n">${fmt.n(r.rps)}</td><td class="n">${fmt.int(r.in_flight)}</td>` +
      `<td>${bar(r.cpu,cpuMax)}${fmt.n(r.cpu)}</td><td>${bar(r.mem,memMax)}${fmt.bytes(r.mem)}</td></tr>`;
  }
  if(rows.length>shown.length) h += `<tr><td colspan="6">… and ${rows.length-shown.length} more</td></tr>`;
  if(!rows.length) h += `<tr><td colspan="6" class="kpi">no instances</td></tr>`;
  return h + "</table>";
}

function decisionLog(name){
  const list = decisions[name]||[];
  if(!list.length) return `<p class="kpi">no scaling decisions yet</p>`;
  let h = `<table><tr><th>time</th><th>change</th><th>reason</th><th>detail</th></tr>`;
  for(const d of list){
    const t = d.inputs&&d.inputs.wall_epoch_secs ? new Date(d.inputs.wall_epoch_secs*1000).toLocaleTimeString() : "";
    const from = d.inputs ? d.inputs.current_desired : "?";
    h += `<tr><td>${t}</td><td class="${d.direction==="up"?"up":d.direction==="down"?"down":""}">${from} → ${d.desired}</td>` +
      `<td>${esc(d.reason)}</td><td style="white-space:normal">${esc(d.detail||"")}</td></tr>`;
  }
  return h + "</table>";
}

function ensureSection(root, name){
  const id = "svc-"+name.replace(/[^A-Za-z0-9_-]/g,"_");
  let sec = document.getElementById(id);
  if(sec) return sec;
  sec = document.createElement("section"); sec.className = "svc"; sec.id = id; sec.dataset.service = name;
  let h = `<h2>${esc(name)} <span class="kpis"></span></h2><div class="grid">`;
  for(const [pid, title] of panels(name))
    h += `<div class="card" data-panel="${pid}"><h3>${title}</h3><div class="legend"></div><canvas></canvas><div class="empty" hidden></div></div>`;
  h += `<div class="card wide"><h3>Instances (now, by CPU)</h3><div class="scroll inst"></div></div>`;
  h += `<div class="card wide"><h3>Scaling decisions (newest first)</h3><div class="scroll dec"></div></div></div>`;
  sec.innerHTML = h; root.appendChild(sec);
  return sec;
}

function render(){
  const root = document.getElementById("root");
  const names = new Set();
  for(const p of points) for(const n in p.services) names.add(n);
  for(const n in instances) names.add(n);
  if(names.size && root.querySelector("p.kpi")) root.innerHTML = "";
  const xs = points.map(p=>p.t);
  for(const name of [...names].sort()){
    const sec = ensureSection(root, name);
    sec.querySelector(".kpis").innerHTML = kpis(name);
    for(const [pid, , series, f, opts, emptyMsg] of panels(name)){
      const card = sec.querySelector(`[data-panel="${pid}"]`); if(!card) continue;
      const cv = card.querySelector("canvas"), em = card.querySelector(".empty");
      const has = series.some(s=>s.ys.some(y=>y!=null));
      card.classList.toggle("compact", !has && !!emptyMsg);
      if(!has && emptyMsg){ cv.hidden = true; em.hidden = false; em.textContent = emptyMsg; cv.dataset.points = 0; card.querySelector(".legend").innerHTML=""; continue; }
      cv.hidden = false; em.hidden = true;
      chart(cv, xs, series, f, opts);
      card.querySelector(".legend").innerHTML = legend(series, f);
    }
    sec.querySelector(".inst").innerHTML = instanceTable(name);
    sec.querySelector(".dec").innerHTML = decisionLog(name);
  }
  // Queues are not per service: depth, and jobs/s by result.
  const queues = new Set(), jobs = new Set();
  for(const p of points){ for(const q in (p.queues||{})) queues.add(q);
    for(const q in (p.queue_jobs||{})) for(const r in p.queue_jobs[q]) jobs.add(q+"\u0000"+r); }
  let qs = document.getElementById("queues");
  if(!qs){ qs = document.createElement("section"); qs.id = "queues"; qs.className = "svc";
    const card = (id, title) => `<div class="card compact" data-panel="${id}"><h3>${title}</h3><div class="legend"></div><canvas></canvas><div class="empty">no queues</div></div>`;
    qs.innerHTML = `<h2>queues</h2><div class="grid">${card("queue", "Queue depth")}${card("jobs", "Jobs / s by result")}</div>`;
    root.appendChild(qs); }
  const pal = Object.values(C);
  const depth = [...queues].sort().map((q,i)=>({label:q, color:pal[i%pal.length], ys:points.map(p=>p.queues&&p.queues[q]!=null?p.queues[q]:null)}));
  const rate = [...jobs].sort().map((k,i)=>{ const [q, r] = k.split("\u0000");
    return {label:`${q} ${r}`, color:pal[i%pal.length], width:r==="done"?2:1,
      ys:points.map(p=>p.queue_jobs&&p.queue_jobs[q]&&p.queue_jobs[q][r]!=null?p.queue_jobs[q][r]:null)}; });
  for(const [id, series, f] of [["queue", depth, fmt.int], ["jobs", rate, fmt.n]]){
    const card = qs.querySelector(`[data-panel="${id}"]`), qc = card.querySelector("canvas"), qe = card.querySelector(".empty");
    if(series.length){ card.classList.remove("compact"); qc.hidden = false; qe.hidden = true;
      chart(qc, xs, series, f); card.querySelector(".legend").innerHTML = legend(series, f); }
    else { qc.hidden = true; qe.hidden = false; qc.dataset.points = 0; card.classList.add("compact"); }
  }
  document.getElementById("clock").textContent = xs.length ? new Date(xs[xs.length-1]*1000).toLocaleTimeString() : "";
}

let pending = false;
function schedule(){ if(pending) return; pending = true; requestAnimationFrame(()=>{ pending = false; render(); }); }
// Hidden tabs get no animation frames: draw when the page shows again.
document.addEventListener("visibilitychange", ()=>{ if(!document.hidden) render(); });
window.addEventListener("resize", schedule);

function load(d){
  span = d.span_secs||SPAN; points = d.points||[]; instances = d.instances||{}; decisions = d.decisions||{};
  render();
}

function connect(){
  const st = document.getElementById("status");
  const es = new EventSource("/api/dashboard/stream");
  es.addEventListener("init", ev=>{ load(JSON.parse(ev.data)); st.textContent = "live"; st.className = "st live"; });
  es.addEventListener("point", ev=>{ const d = JSON.parse(ev.data);
    points.push(d.point); const cut = d.point.t - span; while(points.length && points[0].t < cut) points.shift();
    instances = d.instances||{}; Object.assign(decisions, d.decisions||{});
    st.textContent = "live"; st.className = "st live"; schedule(); });
  // EventSource retries by itself (the server asks for 2 s); a fresh init follows.
  // A refused stream (e.g. too many open) closes for good: retry by hand.
  es.onerror = ()=>{ st.textContent = "reconnecting…"; st.className = "st down";
    if(es.readyState === EventSource.CLOSED) setTimeout(connect, 3000); };
}
// The history comes inside the page, so the first paint is full; the stream then sends its
// own copy (after a reconnect too) and a point a second.
try { load(JSON.parse(document.getElementById("history").textContent)); } catch(e) {}
connect();
