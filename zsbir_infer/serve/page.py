# ruff: noqa: E501  (the pages are kept compact: long lines of inline CSS and JS)
"""The sketch pad (``GET /``) and the offline API docs (``GET /docs``): self-contained pages, no external assets."""

from __future__ import annotations

__all__ = ["docs_html", "pad_html"]

_PAD = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>zsbir sketch pad</title>
<style>
:root{--fg:#1d232a;--muted:#66707a;--bg:#f5f6f8;--card:#fff;--line:#d9dde2;--accent:#2563eb}
*{box-sizing:border-box}
body{margin:0;font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;align-items:baseline;gap:.8em;padding:.7em 1em;background:var(--card);border-bottom:1px solid var(--line)}
header h1{font-size:1.15em;margin:0} header span{color:var(--muted);font-size:.85em}
main{display:grid;grid-template-columns:minmax(280px,440px) 1fr;gap:1em;padding:1em;max-width:1400px;margin:0 auto}
@media (max-width:760px){main{grid-template-columns:1fr;padding:.6em}}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:.8em}
#pad{width:100%;aspect-ratio:1/1;display:block;background:#fff;border:1px solid var(--line);border-radius:8px;
touch-action:none;cursor:crosshair}
#pad:focus-visible{outline:3px solid var(--accent);outline-offset:2px}
#pad.drop{outline:3px dashed var(--accent)}
.tools{display:flex;flex-wrap:wrap;gap:.5em;align-items:center;margin-top:.6em}
button,.file{font:inherit;padding:.45em .8em;border:1px solid var(--line);border-radius:6px;background:#fff;cursor:pointer}
button:hover,.file:hover{border-color:var(--accent)}
button:focus-visible,.file:focus-within,input:focus-visible,a:focus-visible{outline:3px solid var(--accent);outline-offset:1px}
.file input{position:absolute;opacity:0;width:1px;height:1px}
label.size{display:flex;align-items:center;gap:.4em;font-size:.9em}
#status{font-size:.85em;color:var(--muted);margin-top:.6em;min-height:1.2em}
#status.err{color:#b42318}
.hint{font-size:.8em;color:var(--muted);margin:.5em 0 0}
#results{display:grid;grid-template-columns:repeat(auto-fill,minmax(130px,1fr));gap:.6em}
@media (max-width:760px){#results{grid-template-columns:repeat(auto-fill,minmax(100px,1fr))}}
#results a{display:block;text-decoration:none;color:inherit;background:#fafbfc;border:1px solid var(--line);
border-radius:8px;overflow:hidden}
#results a:hover{border-color:var(--accent)}
#results img{width:100%;height:auto;aspect-ratio:1/1;object-fit:cover;display:block;background:#eee}
#results .cap{display:flex;justify-content:space-between;padding:.25em .45em;font-size:.78em}
#results .score{font-weight:600} #results .rank{color:var(--muted)}
#results .path{display:block;padding:0 .45em .35em;font-size:.7em;color:var(--muted);overflow:hidden;
text-overflow:ellipsis;white-space:nowrap}
#empty{color:var(--muted);font-size:.9em}
</style></head><body>
<header><h1>zsbir sketch pad</h1><span id="gallery">draw an object: matching photos appear as you draw</span></header>
<main>
<section class="card" aria-label="Sketch">
<canvas id="pad" width="512" height="512" tabindex="0" role="img"
 aria-label="Drawing area. Draw with a mouse, finger or pen. With the keyboard: arrow keys draw, Enter starts a new stroke."></canvas>
<div class="tools">
<label class="size">Brush <input id="size" type="range" min="2" max="40" value="10" aria-label="Brush size"><output id="sizev">10</output></label>
<button id="undo" type="button" title="Undo (Ctrl+Z)">Undo</button>
<button id="clear" type="button" title="Clear (Escape)">Clear</button>
<label class="file" title="Search with an image file">Upload<input id="file" type="file" accept="image/*" aria-label="Upload an image"></label>
</div>
<div id="status" role="status" aria-live="polite">ready</div>
<p class="hint">Drop an image on the pad to search with it. Keys: Ctrl+Z undo, Escape clear, [ and ] brush size.</p>
</section>
<section class="card" aria-label="Results">
<div id="results" aria-live="polite"></div>
<p id="empty">No search yet.</p>
</section>
</main>
<script>
(function(){
"use strict";
const pad=document.getElementById("pad"),ctx=pad.getContext("2d");
const sizeEl=document.getElementById("size"),sizeV=document.getElementById("sizev");
const statusEl=document.getElementById("status"),results=document.getElementById("results"),empty=document.getElementById("empty");
const K=24,DEBOUNCE=250;
let strokes=[],current=null,timer=null,lastMove=0,seq=0,shown=0,busy=false,again=false,kbd=null;
function setStatus(t,err){statusEl.textContent=t;statusEl.className=err?"err":"";}
function pos(e){const r=pad.getBoundingClientRect();return{x:(e.clientX-r.left)*pad.width/r.width,y:(e.clientY-r.top)*pad.height/r.height,
 p:(e.pointerType==="mouse"||!e.pressure)?0.5:e.pressure};}
function drawStroke(s){
 if(s.img){const im=s.img,sc=Math.min(pad.width/im.width,pad.height/im.height),w=im.width*sc,h=im.height*sc;
  ctx.drawImage(im,(pad.width-w)/2,(pad.height-h)/2,w,h);return;}
 ctx.strokeStyle="#000";ctx.fillStyle="#000";ctx.lineCap="round";ctx.lineJoin="round";
 const pts=s.pts;
 if(pts.length===1){ctx.beginPath();ctx.arc(pts[0].x,pts[0].y,s.size*pts[0].p,0,2*Math.PI);ctx.fill();return;}
 for(let i=1;i<pts.length;i++){ctx.lineWidth=Math.max(1,s.size*2*(pts[i-1].p+pts[i].p)/2);
  ctx.beginPath();ctx.moveTo(pts[i-1].x,pts[i-1].y);ctx.lineTo(pts[i].x,pts[i].y);ctx.stroke();}
}
function redraw(){ctx.fillStyle="#fff";ctx.fillRect(0,0,pad.width,pad.height);strokes.forEach(drawStroke);}
function idle(){document.body.dataset.pending=(busy||again||timer!==null)?"1":"0";}
function schedule(now){clearTimeout(timer);timer=null;if(now){search();return;}
 timer=setTimeout(function(){timer=null;search();},DEBOUNCE);idle();}
function search(){
 if(busy){again=true;return;}
 if(!strokes.length){results.innerHTML="";empty.hidden=false;empty.textContent="Draw something to search.";setStatus("ready");idle();return;}
 busy=true;again=false;idle();const my=++seq,t0=performance.now();
 pad.toBlob(function(blob){
  const fd=new FormData();fd.append("image",blob,"sketch.png");fd.append("k",String(K));
  fetch("/v1/search",{method:"POST",body:fd,credentials:"same-origin"}).then(function(r){
   return r.json().then(function(j){return{ok:r.ok,j:j};});
  }).then(function(res){
   if(!res.ok){throw new Error((res.j.error&&res.j.error.message)||"search failed");}
   if(my>=shown){shown=my;render(res.j.hits);
    setStatus(res.j.hits.length+" results in "+res.j.took_ms.toFixed(1)+" ms on the server, "+(performance.now()-t0).toFixed(0)+" ms round trip");
    document.body.dataset.searches=String(my);}
  }).catch(function(e){setStatus(String(e.message||e),true);})
  .finally(function(){busy=false;if(again)search();else idle();});
 },"image/png");
}
function render(hits){
 results.innerHTML="";empty.hidden=hits.length>0;if(!hits.length)empty.textContent="The gallery is empty.";
 hits.forEach(function(h){
  const a=document.createElement("a");a.href=h.photo||("/v1/photos/"+h.id);a.target="_blank";a.rel="noopener";
  a.dataset.id=String(h.id);a.setAttribute("aria-label","Result "+h.rank+": "+h.path+", score "+h.score.toFixed(3));
  const img=document.createElement("img");img.src=h.thumbnail;img.alt=h.path;img.loading="lazy";img.width=192;img.height=192;
  const cap=document.createElement("div");cap.className="cap";
  const rk=document.createElement("span");rk.className="rank";rk.textContent="#"+h.rank;
  const sc=document.createElement("span");sc.className="score";sc.textContent=h.score.toFixed(3);
  cap.append(rk,sc);const p=document.createElement("span");p.className="path";p.textContent=h.path;p.title=h.path;
  a.append(img,cap,p);results.append(a);
 });
}
pad.addEventListener("pointerdown",function(e){
 if(e.button!==0&&e.pointerType==="mouse")return;pad.setPointerCapture(e.pointerId);e.preventDefault();
 current={size:+sizeEl.value/2,pts:[pos(e)]};strokes.push(current);redraw();
});
pad.addEventListener("pointermove",function(e){
 if(!current)return;const evs=e.getCoalescedEvents?e.getCoalescedEvents():[e];
 evs.forEach(function(ev){current.pts.push(pos(ev));});redraw();
 const now=performance.now();if(now-lastMove>DEBOUNCE){lastMove=now;schedule(true);}else schedule(false);
});
function end(){if(!current)return;current=null;schedule(false);}
pad.addEventListener("pointerup",end);pad.addEventListener("pointercancel",end);
function undo(){strokes.pop();redraw();schedule(true);}
function clearAll(){strokes=[];kbd=null;redraw();schedule(true);}
document.getElementById("undo").addEventListener("click",undo);
document.getElementById("clear").addEventListener("click",clearAll);
sizeEl.addEventListener("input",function(){sizeV.textContent=sizeEl.value;});
function useFile(f){
 if(!f)return;if(!/^image\//.test(f.type)){setStatus("not an image: "+f.name,true);return;}
 const url=URL.createObjectURL(f),im=new Image();
 im.onload=function(){strokes=[{img:im}];redraw();schedule(true);};
 im.onerror=function(){setStatus("cannot read "+f.name,true);};im.src=url;
}
document.getElementById("file").addEventListener("change",function(e){useFile(e.target.files[0]);e.target.value="";});
pad.addEventListener("dragover",function(e){e.preventDefault();pad.classList.add("drop");});
pad.addEventListener("dragleave",function(){pad.classList.remove("drop");});
pad.addEventListener("drop",function(e){e.preventDefault();pad.classList.remove("drop");useFile(e.dataTransfer.files[0]);});
document.addEventListener("keydown",function(e){
 if((e.ctrlKey||e.metaKey)&&e.key.toLowerCase()==="z"){e.preventDefault();undo();return;}
 if(e.target!==pad&&e.target!==document.body)return;
 if(e.key==="Escape"){clearAll();return;}
 if(e.key==="["||e.key==="]"){sizeEl.value=String(+sizeEl.value+(e.key==="]"?2:-2));sizeV.textContent=sizeEl.value;return;}
 if(e.target!==pad)return;
 const d={ArrowLeft:[-1,0],ArrowRight:[1,0],ArrowUp:[0,-1],ArrowDown:[0,1]}[e.key];
 if(e.key==="Enter"){kbd=null;e.preventDefault();return;}
 if(!d)return;e.preventDefault();
 if(!kbd){kbd={size:+sizeEl.value/2,pts:[{x:pad.width/2,y:pad.height/2,p:0.5}]};strokes.push(kbd);}
 const l=kbd.pts[kbd.pts.length-1],step=e.shiftKey?4:16;
 kbd.pts.push({x:Math.min(pad.width,Math.max(0,l.x+d[0]*step)),y:Math.min(pad.height,Math.max(0,l.y+d[1]*step)),p:0.5});
 redraw();schedule(false);
});
redraw();
fetch("/v1/info",{credentials:"same-origin"}).then(function(r){return r.json();}).then(function(j){
 if(j.error){setStatus(j.error.message,true);return;}
 document.getElementById("gallery").textContent=j.files_indexed+" photos, model "+j.fingerprint;
}).catch(function(){});
})();
</script>
</body></html>
"""

_DOCS = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>zsbir API</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:960px;padding:1em;color:#1d232a}
.op{border:1px solid #d9dde2;border-radius:8px;margin:.8em 0;padding:.6em .9em}
.m{display:inline-block;min-width:4.5em;font-weight:700;color:#fff;border-radius:4px;padding:.1em .4em;text-align:center}
.get{background:#2563eb}.post{background:#16a34a} code,pre{font-family:ui-monospace,Menlo,Consolas,monospace}
pre{background:#f5f6f8;padding:.6em;border-radius:6px;overflow:auto;font-size:.8em}
table{border-collapse:collapse;font-size:.85em} td,th{border-bottom:1px solid #eee;padding:.2em .6em;text-align:left}
</style></head><body>
<h1 id="title">zsbir API</h1><p id="desc"></p><p><a href="/openapi.json">openapi.json</a> &middot; <a href="/">sketch pad</a></p>
<div id="ops"></div>
<h2>Schemas</h2><div id="schemas"></div>
<script>
(function(){
"use strict";
function el(t,c,txt){const e=document.createElement(t);if(c)e.className=c;if(txt!==undefined)e.textContent=txt;return e;}
fetch("/openapi.json").then(function(r){return r.json();}).then(function(doc){
 document.getElementById("title").textContent=doc.info.title+" "+doc.info.version;
 document.getElementById("desc").textContent=doc.info.description||"";
 const ops=document.getElementById("ops");
 Object.keys(doc.paths).forEach(function(p){Object.keys(doc.paths[p]).forEach(function(m){
  const op=doc.paths[p][m],d=el("div","op"),h=el("div");
  h.append(el("span","m "+m,m.toUpperCase())," ",el("code","",p)," ",el("span","",op.summary||""));d.append(h);
  if(op.description)d.append(el("p","",op.description));
  if(op.parameters&&op.parameters.length){const t=el("table");
   op.parameters.forEach(function(q){const tr=el("tr");tr.append(el("td","",q.name),el("td","",q.in),el("td","",JSON.stringify(q.schema)));t.append(tr);});d.append(t);}
  if(op.requestBody){Object.keys(op.requestBody.content).forEach(function(ct){d.append(el("div","","body: "+ct));
   d.append(el("pre","",JSON.stringify(op.requestBody.content[ct].schema,null,1)));});}
  const t=el("table");Object.keys(op.responses).forEach(function(s){const tr=el("tr");
   tr.append(el("td","",s),el("td","",op.responses[s].description||""));t.append(tr);});d.append(t);
  ops.append(d);});});
 const sc=document.getElementById("schemas");Object.keys(doc.components.schemas).forEach(function(n){
  sc.append(el("h3","",n),el("pre","",JSON.stringify(doc.components.schemas[n],null,1)));});
});
})();
</script></body></html>
"""


def pad_html() -> str:
    """The sketch pad page."""
    return _PAD


def docs_html() -> str:
    """The API docs page (renders ``/openapi.json`` in the browser, no external assets)."""
    return _DOCS
