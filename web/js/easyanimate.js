// EasyAnimate's page extension:
//  * notes under the node: the text a node of ours returns (ui.text: the size actually used, the memory plan,
//    the sampler's summary, warnings) is shown in a read-only box at the bottom of that node after each run,
//    as ComfyUI's Preview Any does for itself. The box is never saved in the workflow nor sent with the prompt.
//  * the Model Loader's list marks official models that are not downloaded yet ("… (not downloaded)"):
//    picking one downloads it on the first run.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NOTES_WIDGET = "easyanimate_notes";
const NOT_DOWNLOADED = " (not downloaded)";

function showNotes(node, lines) {
    let widget = node.widgets?.find((w) => w.name === NOTES_WIDGET);
    if (!widget) {
        const box = document.createElement("textarea");
        box.readOnly = true;
        box.className = "comfy-multiline-input easyanimate-notes";
        box.style.cssText = "width:100%;min-height:3.2em;font-size:11px;line-height:1.35;opacity:0.9;resize:none;"
            + "white-space:pre-wrap;overflow-y:auto;";
        widget = node.addDOMWidget(NOTES_WIDGET, "easyanimate_notes", box, {
            serialize: false,
            hideOnZoom: false,
            getValue: () => box.value,
            setValue: (value) => { box.value = value ?? ""; },
            getMinHeight: () => 48,
        });
        widget.serialize = false; // not in widgets_values: the saved workflow stays as it was
    }
    widget.element.value = lines.join("\n");
    widget.element.title = widget.element.value;
    const wanted = node.computeSize();
    node.setSize([Math.max(node.size[0], wanted[0]), Math.max(node.size[1], wanted[1])]);
    node.setDirtyCanvas(true, true);
}

let modelStatus = null;
async function notDownloaded() {
    modelStatus ??= api.fetchApi("/easyanimate/models").then((r) => r.json()).catch(() => ({ not_downloaded: [] }));
    return new Set((await modelStatus).not_downloaded ?? []);
}

async function markNotDownloaded(node) {
    const widget = node.widgets?.find((w) => w.name === "model_name");
    if (!widget) return;
    const missing = await notDownloaded();
    widget.options.getOptionLabel = (value) => (missing.has(value) ? value + NOT_DOWNLOADED : value);
    node.setDirtyCanvas(true, true);
}

app.registerExtension({
    name: "EasyAnimate.NodeNotes",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData.name?.startsWith("EasyAnimate")) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const result = onExecuted?.apply(this, arguments);
            const text = message?.text;
            if (Array.isArray(text) && text.length) showNotes(this, text.map(String));
            if (nodeData.name === "EasyAnimateModelLoader") { // it may just have downloaded its model
                modelStatus = null;
                markNotDownloaded(this);
            }
            return result;
        };
        if (nodeData.name === "EasyAnimateModelLoader") {
            const onNodeCreated = nodeType.prototype.onNodeCreated;
            nodeType.prototype.onNodeCreated = function () {
                const result = onNodeCreated?.apply(this, arguments);
                markNotDownloaded(this);
                return result;
            };
        }
    },
    async refreshComboInNodes() {
        modelStatus = null; // R (refresh node definitions): the models folder may have changed
        for (const node of app.graph?._nodes ?? []) {
            if (node.type === "EasyAnimateModelLoader") markNotDownloaded(node);
        }
    },
});
