// Test stand-in (tests/vhs_stub) for the two parts of VideoHelperSuite's web extension (web/js/VHS.core.js)
// that decide what a loaded workflow holds; everything else of VHS's UI (previews, upload button, help) is left out.
//  * useKVState: VHS saves widgets_values as an object keyed by widget name and restores it by name on load.
//    Without this the frontend ignores such an object and leaves every VHS widget at its default.
//  * addFormatWidgets: VHS_VideoCombine's "format" combo inserts the widgets of the chosen format
//    (video/h264-mp4: pix_fmt, crf, save_metadata, trim_to_audio) right after itself, from the
//    "formats" option of its /object_info.
import { app } from "../../scripts/app.js";

function chainCallback(object, property, callback) {
    if (object == undefined) return;
    if (property in object && object[property]) {
        const original = object[property];
        object[property] = function () {
            const result = original.apply(this, arguments);
            return callback.apply(this, arguments) ?? result;
        };
    } else {
        object[property] = callback;
    }
}

function useKVState(nodeType) {
    chainCallback(nodeType.prototype, "onNodeCreated", function () {
        chainCallback(this, "onConfigure", function (info) {
            const values = info?.widgets_values;
            if (!this.widgets || !values || typeof values !== "object" || Array.isArray(values)) return;
            // a live loop: widgets that "format" inserts after itself are restored in the same pass
            for (const widget of this.widgets) {
                if (widget.type === "button" || !(widget.name in values)) continue;
                widget.value = values[widget.name];
                widget.callback?.(widget.value);
            }
        });
        chainCallback(this, "onSerialize", function (info) {
            info.widgets_values = {};
            for (const widget of this.widgets ?? []) info.widgets_values[widget.name] = widget.value;
        });
    });
}

function addFormatWidgets(nodeType) {
    chainCallback(nodeType.prototype, "onNodeCreated", function () {
        const formatWidget = this.widgets?.find((widget) => widget.name === "format");
        if (!formatWidget) return;
        const index = this.widgets.indexOf(formatWidget) + 1;
        let count = 0;
        chainCallback(formatWidget, "callback", (value) => {
            const formats = LiteGraph.registered_node_types[this.type]?.nodeData?.input?.required?.format?.[1]?.formats;
            const created = [];
            for (const definition of formats?.[value] ?? []) {
                let type = definition[2]?.widgetType ?? definition[1];
                if (Array.isArray(type)) type = "COMBO";
                app.widgets[type](this, definition[0], definition.slice(1), app);
                const widget = this.widgets.pop();
                widget.config = definition.slice(1);
                created.push(widget);
            }
            this.widgets.splice(index, count, ...created);
            count = created.length;
        });
        formatWidget.callback?.(formatWidget.value);
    });
}

app.registerExtension({
    name: "EasyAnimateTests.VideoHelperSuiteStandIn",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData?.name === "VHS_VideoCombine" || nodeData?.name === "VHS_LoadVideo") {
            useKVState(nodeType);
            if (nodeData.name === "VHS_VideoCombine") addFormatWidgets(nodeType);
        }
    },
});
