//! hostd's HTTP API (JSON over actix-web). Every error is a JSON body with a message; a VM,
//! host or migration that does not exist is a 404.

use std::sync::Arc;

use actix::Addr;
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, Data, Json, Path, Query};
use actix_web::{HttpResponse, ResponseError};
use ferry_actors::host_actor::{
    CancelMigration, ConsoleOf, CreateVm, EnterMaintenance, ErrorKind, ExitMaintenance,
    GetHostInfo, GetMaintenance, GetMigration, GetVm, HostActor, HostError, ListMigrations,
    ListVms, OperateVm, RenderMetrics, StartMigration, parse_operation,
};
use ferry_actors::lifecycle::Event;
use ferry_actors::settings::HostSettings;
use serde::Deserialize;

use crate::api_types::{
    CreateVmRequest, ErrorBody, MaintenanceRequest, MigrateRequest, RecoverRequest,
};

/// An API error: a `HostError` with its status code.
#[derive(Debug)]
pub struct ApiError(pub HostError);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self.0.kind {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: self.0.message.clone(),
            kind: self.0.kind,
        })
    }
}

impl From<HostError> for ApiError {
    fn from(e: HostError) -> Self {
        ApiError(e)
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(e: actix::MailboxError) -> Self {
        ApiError(HostError {
            kind: ErrorKind::Internal,
            message: format!("host actor unavailable: {e}"),
        })
    }
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError(HostError {
        kind: ErrorKind::BadRequest,
        message: message.into(),
    })
}

type Host = Data<Addr<HostActor>>;
type Settings = Data<Arc<HostSettings>>;
type ApiResult = Result<HttpResponse, ApiError>;

async fn host_info(host: Host) -> ApiResult {
    Ok(HttpResponse::Ok().json(host.send(GetHostInfo).await?))
}

async fn maintenance(host: Host) -> ApiResult {
    Ok(HttpResponse::Ok().json(host.send(GetMaintenance).await?))
}

async fn enter_maintenance(
    host: Host,
    settings: Settings,
    body: Json<MaintenanceRequest>,
) -> ApiResult {
    if !body.options.to.is_empty() {
        return Err(bad_request(
            "an evacuation places every VM itself: leave 'to' out of its options",
        ));
    }
    let options = body
        .options
        .options(&settings.migration.defaults)
        .map_err(bad_request)?;
    let total_bandwidth = body.total_bandwidth().map_err(bad_request)?;
    let status = host
        .send(EnterMaintenance {
            evacuate: body.evacuate,
            total_bandwidth,
            datastore: options.datastore.clone(),
            options,
        })
        .await??;
    Ok(HttpResponse::Accepted().json(status))
}

async fn exit_maintenance(host: Host) -> ApiResult {
    Ok(HttpResponse::Ok().json(host.send(ExitMaintenance).await??))
}

async fn list_vms(host: Host) -> ApiResult {
    Ok(HttpResponse::Ok().json(host.send(ListVms).await?))
}

async fn create_vm(host: Host, body: Json<CreateVmRequest>) -> ApiResult {
    let spec = body.to_spec().map_err(bad_request)?;
    let info = host.send(CreateVm(spec)).await??;
    Ok(HttpResponse::Created().json(info))
}

async fn get_vm(host: Host, name: Path<String>) -> ApiResult {
    Ok(HttpResponse::Ok().json(host.send(GetVm(name.into_inner())).await??))
}

async fn operate_vm(host: Host, path: Path<(String, String)>) -> ApiResult {
    let (name, op) = path.into_inner();
    let event = parse_operation(&op).ok_or_else(|| {
        ApiError(HostError {
            kind: ErrorKind::NotFound,
            message: format!("unknown VM operation '{op}' (use pause, resume or stop)"),
        })
    })?;
    Ok(HttpResponse::Ok().json(host.send(OperateVm { name, event }).await??))
}

#[derive(Debug, Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    follow: bool,
    /// Absolute byte offset to start from; the response says where it starts in the
    /// `x-console-offset` header.
    #[serde(default)]
    offset: u64,
}

/// Response header: absolute offset of the first byte of a console response.
pub const CONSOLE_OFFSET_HEADER: &str = "x-console-offset";

async fn console(host: Host, name: Path<String>, query: Query<ConsoleQuery>) -> ApiResult {
    let (start, history, feed) = host
        .send(ConsoleOf {
            name: name.into_inner(),
            offset: query.offset,
        })
        .await??;
    if !query.follow {
        return Ok(HttpResponse::Ok()
            .content_type("text/plain")
            .insert_header((CONSOLE_OFFSET_HEADER, start.to_string()))
            .body(history));
    }
    // The console feed is a blocking channel; a thread bridges it to the async response and
    // ends when the VM goes away or the client disconnects.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let _ = tx.send(Bytes::from(history));
    std::thread::spawn(move || {
        while let Ok(chunk) = feed.recv() {
            if tx.send(Bytes::from(chunk)).is_err() {
                break;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, actix_web::Error>(chunk), rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/plain")
        .streaming(stream))
}

async fn migrate(
    host: Host,
    settings: Settings,
    name: Path<String>,
    body: Json<MigrateRequest>,
) -> ApiResult {
    let options = body
        .options(&settings.migration.defaults)
        .map_err(bad_request)?;
    let report = host
        .send(StartMigration {
            vm: name.into_inner(),
            to: body.to.clone(),
            options,
        })
        .await??;
    Ok(HttpResponse::Accepted().json(report))
}

async fn recover_vm(host: Host, name: Path<String>, body: Json<RecoverRequest>) -> ApiResult {
    if !body.from_stale_copy {
        return Err(bad_request(
            "recovering runs the stale copy a lost switch-over left paused here, and its guest goes back to the moment of that switch-over; send {\"from_stale_copy\": true} to do it",
        ));
    }
    let name = name.into_inner();
    tracing::warn!(vm = %name, "operator recovers the VM from its stale copy: the guest goes back to the moment of the switch-over");
    Ok(HttpResponse::Ok().json(
        host.send(OperateVm {
            name,
            event: Event::RecoverStale,
        })
        .await??,
    ))
}

async fn cancel_migration(host: Host, name: Path<String>) -> ApiResult {
    Ok(HttpResponse::Ok().json(host.send(CancelMigration(name.into_inner())).await??))
}

async fn list_migrations(host: Host) -> ApiResult {
    Ok(HttpResponse::Ok().json(host.send(ListMigrations).await?))
}

async fn get_migration(host: Host, id: Path<String>) -> ApiResult {
    Ok(HttpResponse::Ok().json(host.send(GetMigration(id.into_inner())).await??))
}

async fn metrics(host: Host) -> ApiResult {
    Ok(HttpResponse::Ok()
        .content_type(ferry_actors::metrics::CONTENT_TYPE)
        .body(host.send(RenderMetrics).await?))
}

async fn not_found() -> ApiResult {
    Err(ApiError(HostError {
        kind: ErrorKind::NotFound,
        message: "no such API endpoint (see /v1/host, /v1/vms, /v1/migrations, /metrics)".into(),
    }))
}

/// A 400 with a JSON body for input actix-web could not parse.
fn bad_input(
    what: &str,
    err: impl std::fmt::Display + std::fmt::Debug + 'static,
) -> actix_web::Error {
    let message = format!("{what}: {err}");
    actix_web::error::InternalError::from_response(
        err,
        HttpResponse::BadRequest().json(ErrorBody {
            error: message,
            kind: ErrorKind::BadRequest,
        }),
    )
    .into()
}

/// Registers the routes.
pub fn configure(cfg: &mut web::ServiceConfig) {
    let json = web::JsonConfig::default()
        .limit(1 << 20)
        .error_handler(|err, _| bad_input("invalid request body", err));
    let path = web::PathConfig::default().error_handler(|err, _| bad_input("invalid path", err));
    cfg.app_data(json)
        .app_data(path)
        .route("/v1/host", web::get().to(host_info))
        .route("/v1/host/maintenance", web::get().to(maintenance))
        .route(
            "/v1/host/maintenance/enter",
            web::post().to(enter_maintenance),
        )
        .route(
            "/v1/host/maintenance/exit",
            web::post().to(exit_maintenance),
        )
        .route("/v1/vms", web::get().to(list_vms))
        .route("/v1/vms", web::post().to(create_vm))
        .route("/v1/vms/{name}", web::get().to(get_vm))
        .route("/v1/vms/{name}/console", web::get().to(console))
        .route("/v1/vms/{name}/migrate", web::post().to(migrate))
        .route(
            "/v1/vms/{name}/migrate/cancel",
            web::post().to(cancel_migration),
        )
        .route("/v1/vms/{name}/recover", web::post().to(recover_vm))
        .route("/v1/vms/{name}/{op}", web::post().to(operate_vm))
        .route("/v1/migrations", web::get().to(list_migrations))
        .route("/v1/migrations/{id}", web::get().to(get_migration))
        .route("/metrics", web::get().to(metrics))
        .default_service(web::to(not_found));
}
